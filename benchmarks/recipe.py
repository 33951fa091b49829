"""The training defaults before and after issue 23 ("drafters that generalise"), for both drafters, on a small
model built here from real text, measured by vLLM's acceptance on held-back prompts, at two data sizes.

    .venv/bin/python benchmarks/recipe.py                              # about 70 minutes on 2 CPU cores
    .venv/bin/python benchmarks/recipe.py --points small --drafters medusa

What a new user does, several times on the same data, measured the same way:

1. A base model: a Llama (hidden 128, 4 layers, its own 4k BPE vocabulary) pretrained here on real English:
   the paragraphs of Python's reference documentation (``pydoc_data.topics``), the installed packages'
   descriptions, and the docstrings of a few large installed packages, read with ``ast`` (nothing imported,
   nothing downloaded). Each paragraph becomes a chat: the user gives its first sentence and asks for more.
2. Prompts the model never saw in pretraining: ``--eval-prompts`` held back for vLLM, and ``--large``
   conversations distilled once with vLLM (their first ``--small`` are the small-data point).
   The pool of prompts kept out of pretraining is fixed (3000), so ``--large`` does not change the base model.
3. For each point and drafter (Medusa only at the larger point unless ``--large-drafters`` says otherwise),
   ``train`` → ``export`` → ``eval`` with:
   - **before**: the defaults as they were: replies re-tokenized from their text (the distilled token ids
     dropped), validation sized in conversations only, patience on the raw validation value, any rise counts,
     at most 20 epochs (``val_min_tokens=0 min_improvement=0 val_smoothing=0 max_epochs=20``);
   - **after**: today's defaults, on the distilled token ids; and the same at the old 20-epoch cap;
   - ablations for Medusa on the small point, at the old 20-epoch cap: each change alone, soft targets on
     (or off, whichever is not the default), another seed (the size of the noise), and four sampled replies
     per prompt (``distill.samples_per_prompt=4``, temperature 0.8) instead of one greedy one.

Prints one table per point (vLLM acceptance length, speed-up, validation estimate, steps and the best step,
greedy outputs identical) and writes everything to ``<out>/results.json``. A finished variant is kept
(``<out>/variants/``) and not rerun unless ``--fresh``; the distilled data and the model are reused while their
settings match.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import random
import re
import shutil
import site
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_WORDS = re.compile(r"[A-Za-z][a-z]+")
DOCSTRING_PACKAGES = ("transformers", "ray", "torch")

PROMPT_POOL = 3000  # prompts kept out of pretraining (fixed, so the base model does not change with --large)

# distill.samples_per_prompt's ablation: this many replies to each small-point prompt, sampled.
SAMPLES, SAMPLE_TEMPERATURE = 4, 0.8

# The stop rule as it was before issue 23: validation by conversations, the raw value, any rise counts.
OLD_STOP_RULE = ["train.val_min_tokens=0", "train.min_improvement=0", "train.val_smoothing=0"]
OLD_CAP = ["train.max_epochs=20"]  # the epoch cap before issue 23


def _prose(text: str) -> list[str]:
    """Paragraphs of running English from reST/Markdown: no code, tables, lists of links or headings."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").splitlines()
        if not lines or any(line.lstrip().startswith((">>>", "|", "```", "..", "#", "=", "$", "{", "<"))
                            for line in lines):
            continue
        para = re.sub(r"\s+", " ", block).strip().lstrip("*-+ ")
        words = para.split()
        if not 20 <= len(words) <= 300:
            continue
        # Mostly words, not identifiers, URLs or markup.
        if len(_WORDS.findall(para)) < 0.6 * len(words) or "://" in para:
            continue
        out.append(para)
    return out


def _docstrings(package: str) -> list[str]:
    """Every module, class and function docstring of an installed package, parsed from source (not imported)."""
    found = []
    for root in map(Path, site.getsitepackages()):
        for source in sorted((root / package).rglob("*.py")):
            try:
                tree = ast.parse(source.read_text(errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        found.append(doc)
    return found


def real_paragraphs() -> list[tuple[str, str]]:
    """(source, paragraph) from Python's reference docs, the installed packages' descriptions and docstrings."""
    from pydoc_data.topics import topics

    found = [("the Python reference", p) for _, text in sorted(topics.items()) for p in _prose(text)]
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = dist.read_text("METADATA") or ""
        description = body.split("\n\n", 1)[1] if "\n\n" in body else ""
        found += [(f"the {dist.metadata['Name']} documentation", p) for p in _prose(description)]
    for package in DOCSTRING_PACKAGES:
        found += [(f"the {package} source", p) for doc in _docstrings(package) for p in _prose(doc)]
    unique = {p: s for s, p in found if ". " in p}
    return sorted(((s, p) for p, s in unique.items()), key=lambda sp: sp[1])


def as_chat(source: str, paragraph: str) -> list[dict[str, str]]:
    first, _, rest = paragraph.partition(". ")
    return [{"role": "user", "content": f"Continue this passage from {source}: {first}."},
            {"role": "assistant", "content": rest}]


def _write_jsonl(path: Path, chats: list[list[dict[str, str]]]) -> None:
    path.write_text("".join(json.dumps({"messages": c[:1]}) + "\n" for c in chats))


def _subset(distilled: Path, out: Path, prompts: set[str], drop_token_ids: bool) -> int:
    """The distilled rows whose prompt is in ``prompts``, optionally without their generated ids, as one Parquet
    file in ``out`` (rewritten only when missing)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (out / "rows.parquet").exists():
        return pq.read_metadata(out / "rows.parquet").num_rows
    tables = [pq.read_table(f) for f in sorted(distilled.rglob("*.parquet"))]
    table = pa.concat_tables(tables, promote_options="default")
    rows = [r for r in table.to_pylist() if r["messages"][0]["content"] in prompts]
    if drop_token_ids:
        for r in rows:
            r["messages"] = [{**m, "token_ids": None} for m in r["messages"]]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "rows.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), tmp)
    tmp.rename(out / "rows.parquet")
    return len(rows)


def variants(point: str, drafter: str, soft_default: float) -> list[tuple[str, str, list[str]]]:
    """(name, data: "exact"|"retokenized"|"sampled", overrides) for one point and drafter."""
    rows = [("before: old defaults", "retokenized", OLD_STOP_RULE + OLD_CAP),
            ("after: today's defaults", "exact", []),
            ("  exact ids + stop rule, old 20-epoch cap", "exact", OLD_CAP)]
    if point == "small" and drafter == "medusa":  # each change alone, where a run is cheap (at the old cap)
        other = 0.5 if soft_default == 0 else 0.0
        rows += [("  exact ids only", "exact", OLD_STOP_RULE + OLD_CAP),
                 ("  stop rule only", "retokenized", OLD_CAP),
                 (f"  20 epochs, soft_target_weight={other:g}", "exact",
                  OLD_CAP + [f"train.soft_target_weight={other}"]),
                 ("  20 epochs, train.seed=1 (the noise)", "exact", OLD_CAP + ["train.seed=1"]),
                 (f"  20 epochs, {SAMPLES} replies per prompt (temperature {SAMPLE_TEMPERATURE:g})", "sampled",
                  OLD_CAP)]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench-recipe")
    p.add_argument("--small", type=int, default=400, help="conversations at the small-data point")
    p.add_argument("--large", type=int, default=PROMPT_POOL, help="conversations at the larger-data point "
                   f"(at most {PROMPT_POOL})")
    p.add_argument("--eval-prompts", type=int, default=64, help="held back from distillation, decoded by eval")
    p.add_argument("--max-tokens", type=int, default=128, help="reply length, in distill and eval")
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--points", default="small,large")
    p.add_argument("--drafters", default="medusa,eagle3", help="drafters at the small-data point")
    p.add_argument("--large-drafters", default="medusa", help="drafters at the larger-data point (EAGLE-3 there "
                   "takes about 40 minutes a run on 2 CPU cores: add it where you have the time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="rerun every variant, even those already measured")
    args = p.parse_args()

    from medusa_ray import distill, evaluate, export, train
    from medusa_ray.cluster import init_ray
    from medusa_ray.config import build_config
    from medusa_ray.drafters.medusa import MedusaKeys
    from medusa_ray.tiny import make_tiny_model

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus_file = out / "corpus.json"
    if not corpus_file.exists():
        corpus_file.write_text(json.dumps(real_paragraphs()))
    paragraphs = [tuple(sp) for sp in json.loads(corpus_file.read_text())]
    random.Random(args.seed).shuffle(paragraphs)
    if not args.small <= args.large <= PROMPT_POOL:
        raise SystemExit(f"need --small <= --large <= {PROMPT_POOL}")
    n_prompts = args.eval_prompts + PROMPT_POOL
    if len(paragraphs) < 3 * n_prompts:
        raise SystemExit(f"only {len(paragraphs)} paragraphs of real text here; ask for fewer prompts")
    eval_paras = paragraphs[:args.eval_prompts]
    prompt_paras = paragraphs[args.eval_prompts:n_prompts]
    pretrain_paras = paragraphs[n_prompts:]
    print(f"real text: {len(paragraphs)} paragraphs; {len(pretrain_paras)} pretrain the base model, "
          f"{len(prompt_paras)} (unseen) are distilled, {len(eval_paras)} (unseen) are held back for vLLM")

    model_dir = out / "model"
    stamp = {"pretrain_steps": args.pretrain_steps, "seed": args.seed, "paragraphs": len(pretrain_paras)}
    stamp_file = out / "model.json"
    if not (model_dir / "config.json").exists() or not stamp_file.exists() \
            or json.loads(stamp_file.read_text()) != stamp:
        shutil.rmtree(out / "distilled", ignore_errors=True)
        shutil.rmtree(out / "data", ignore_errors=True)
        shutil.rmtree(out / "variants", ignore_errors=True)
        t0 = time.perf_counter()
        make_tiny_model(model_dir, pretrain_steps=args.pretrain_steps, seed=args.seed, vocab_size=4096,
                        hidden_size=128, num_layers=4, conversations=[as_chat(s, t) for s, t in pretrain_paras])
        stamp_file.write_text(json.dumps(stamp))
        print(f"base model pretrained in {time.perf_counter() - t0:.0f} s")

    prompts_file, heldout_file = out / "prompts.jsonl", out / "heldout.jsonl"
    _write_jsonl(prompts_file, [as_chat(s, t) for s, t in prompt_paras])
    _write_jsonl(heldout_file, [as_chat(s, t) for s, t in eval_paras])

    engine = {"max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.1}
    common = [f"model={model_dir}", f"distill.input={prompts_file}", f"distill.output_dir={out}/distilled",
              f"distill.max_tokens={args.max_tokens}", f"distill.engine_kwargs={json.dumps(engine)}",
              f"eval.prompts={heldout_file}", f"eval.num_prompts={args.eval_prompts}",
              f"eval.max_tokens={args.max_tokens}", f"eval.engine_kwargs={json.dumps(engine)}",
              f"train.storage_path={out / 'ray_results'}", "export.overwrite=true"]
    cfg = build_config(overrides=common)
    init_ray(cfg.ray)

    t0 = time.perf_counter()
    summary = distill.run(cfg)  # resumes: rows already distilled are skipped
    print(f"distilled {summary.rows_out} new rows ({summary.skipped} kept from before) in "
          f"{time.perf_counter() - t0:.0f} s")

    soft_default = MedusaKeys().soft_target_weight
    results: dict[str, dict] = {}
    for point in args.points.split(","):
        size = {"small": args.small, "large": args.large}[point]
        prompts = {as_chat(s, t)[0]["content"] for s, t in prompt_paras[:size]}
        data = {kind: out / "data" / f"{point}-{kind}" for kind in ("exact", "retokenized")}
        rows = {kind: _subset(out / "distilled", where, prompts, kind == "retokenized")
                for kind, where in data.items()}
        results[point] = {"conversations": rows["exact"], "runs": {}}
        if point == "small":  # the same prompts answered SAMPLES times each, distilled on first use
            data["sampled"] = out / "distilled-sampled"
        for drafter in (args.drafters if point == "small" else args.large_drafters).split(","):
            for name, kind, overrides in variants(point, drafter, soft_default):
                slug = re.sub(r"[^a-z0-9]+", "-", f"{point} {drafter} {name}".lower()).strip("-")
                done = out / "variants" / f"{slug}.json"
                if done.exists() and not args.fresh:
                    results[point]["runs"][f"{drafter} | {name}"] = json.loads(done.read_text())
                    continue
                if kind == "sampled":
                    small_prompts = out / "prompts-small.jsonl"
                    _write_jsonl(small_prompts, [as_chat(s, t) for s, t in prompt_paras[:size]])
                    distill.run(build_config(overrides=common + [
                        f"distill.input={small_prompts}", f"distill.output_dir={data['sampled']}",
                        f"distill.samples_per_prompt={SAMPLES}", f"distill.temperature={SAMPLE_TEMPERATURE}"]))
                shutil.rmtree(out / "ray_results" / slug, ignore_errors=True)
                vcfg = build_config(overrides=common + overrides + [
                    f"train.method={drafter}", f"train.data={data[kind]}", f"train.run_name={slug}",
                    f"export.output_dir={out}/export/{slug}"])
                t0 = time.perf_counter()
                trained = train.run(vcfg)
                train_s = time.perf_counter() - t0
                exported = export.run(vcfg)  # the best checkpoint, as a user's export picks it
                measured = evaluate.run(vcfg, draft_dir=str(exported.path))
                run = {"acceptance_length": measured["acceptance_length"], "speedup": measured["speedup"],
                       "outputs_identical": measured["outputs_identical"], "steps": trained.global_step,
                       "best_step": trained.validation.get("best_step"), "stop_reason": trained.stop_reason,
                       "estimate": trained.best_validation.get("expected_acceptance"),
                       "retokenized": trained.data.get("retokenized"), "train_s": round(train_s),
                       "overrides": overrides, "data": kind}
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(run, indent=2))
                results[point]["runs"][f"{drafter} | {name}"] = run
                print(f"{point} {drafter} {name}: acceptance {run['acceptance_length']:.3f}, "
                      f"{run['steps']} steps, {train_s:.0f} s")

    for point, res in results.items():
        print(f"\n{point}: {res['conversations']} distilled conversations, {args.eval_prompts} held-back prompts, "
              f"{args.max_tokens} tokens each\n")
        print("| drafter | training | acceptance length (vLLM) | speed-up | validation estimate | steps (best) "
              "| identical |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for key, r in res["runs"].items():
            drafter, name = key.split(" | ")
            estimate = f"{r['estimate']:.3f}" if r["estimate"] is not None else "-"
            print(f"| {drafter} | {name.strip()} | {r['acceptance_length']:.3f} | {r['speedup']:.2f}× | {estimate} "
                  f"| {r['steps']} ({r['best_step']}) | {'yes' if r['outputs_identical'] else 'NO'} |")
    (out / "results.json").write_text(json.dumps({"eval_prompts": args.eval_prompts, "max_tokens": args.max_tokens,
                                                  "soft_target_weight_default": soft_default,
                                                  "points": results}, indent=2))
    print(f"\nwritten {out / 'results.json'}")


if __name__ == "__main__":
    main()
