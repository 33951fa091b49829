"""Default training vs the textbook Medusa-1 recipe, on a small model built here from real text.

    .venv/bin/python benchmarks/recipe.py                 # ~30 min on 2 CPU cores
    .venv/bin/python benchmarks/recipe.py --prompts 600   # more data

What a new user does, twice on the same data, measured the same way:

1. A base model: a Llama (hidden 128, 4 layers, its own 4k BPE vocabulary) pretrained here on real English
   prose: the paragraphs of Python's own reference documentation (``pydoc_data.topics``) and the long
   descriptions of the packages installed in this environment. Each paragraph becomes a chat: the user
   gives its first sentence and asks for more, the assistant answers with the rest. Nothing is downloaded.
2. Prompts the model never saw in pretraining (a disjoint set of paragraphs), as messages JSONL.
3. ``medusa-ray pipeline`` with every training setting at its default: it holds back ``--eval-prompts``
   conversations, distills the rest with vLLM, trains (early stopping on validation expected acceptance),
   exports the best checkpoint and measures acceptance in vLLM on the held-back prompts.
4. The textbook recipe (Medusa-1: 2 epochs, lr 1e-3, cosine schedule, warmup 0.1, no validation split) on
   the same distilled rows, exported and measured by ``medusa-ray eval`` on the same held-back prompts.

Prints one table (acceptance length, speed-up, optimizer steps, training time) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_WORDS = re.compile(r"[A-Za-z][a-z]+")


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


def real_paragraphs() -> list[tuple[str, str]]:
    """(source, paragraph) from Python's reference docs and the installed packages' descriptions."""
    from pydoc_data.topics import topics

    found = [("the Python reference", p) for _, text in sorted(topics.items()) for p in _prose(text)]
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = dist.read_text("METADATA") or ""
        description = body.split("\n\n", 1)[1] if "\n\n" in body else ""
        found += [(f"the {dist.metadata['Name']} documentation", p) for p in _prose(description)]
    unique = {p: s for s, p in found}
    return sorted(((s, p) for p, s in unique.items()), key=lambda sp: sp[1])


def as_chat(source: str, paragraph: str) -> list[dict[str, str]]:
    first, _, rest = paragraph.partition(". ")
    return [{"role": "user", "content": f"Continue this passage from {source}: {first}."},
            {"role": "assistant", "content": rest}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/bench-recipe")
    p.add_argument("--prompts", type=int, default=400, help="prompts given to the pipeline (held-back ones included)")
    p.add_argument("--eval-prompts", type=int, default=64, help="held back from distillation, decoded by eval")
    p.add_argument("--max-tokens", type=int, default=128, help="reply length, in distill and eval")
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from medusa_ray import evaluate, export, pipeline, train
    from medusa_ray.cluster import init_ray
    from medusa_ray.config import build_config
    from medusa_ray.tiny import make_tiny_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = [sp for sp in real_paragraphs() if ". " in sp[1]]
    random.Random(args.seed).shuffle(paragraphs)
    if len(paragraphs) < 3 * args.prompts:
        raise SystemExit(f"only {len(paragraphs)} paragraphs of real text here; ask for fewer --prompts")
    prompt_paragraphs, pretrain_paragraphs = paragraphs[: args.prompts], paragraphs[args.prompts:]
    print(f"real text: {len(paragraphs)} paragraphs; {len(pretrain_paragraphs)} pretrain the base model, "
          f"{len(prompt_paragraphs)} (unseen) are the prompts")

    model_dir = out / "model"
    stamp = {"pretrain_steps": args.pretrain_steps, "seed": args.seed, "paragraphs": len(pretrain_paragraphs)}
    stamp_file = out / "model.json"
    if not (model_dir / "config.json").exists() or not stamp_file.exists() or json.loads(stamp_file.read_text()) != stamp:
        t0 = time.perf_counter()
        make_tiny_model(model_dir, pretrain_steps=args.pretrain_steps, seed=args.seed, vocab_size=4096,
                        hidden_size=128, num_layers=4,
                        conversations=[as_chat(s, para) for s, para in pretrain_paragraphs])
        stamp_file.write_text(json.dumps(stamp))
        print(f"base model pretrained in {time.perf_counter() - t0:.0f} s")

    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"messages": as_chat(s, para)[:1]}) + "\n"
                                    for s, para in prompt_paragraphs))

    engine = {"max_model_len": 1024, "enforce_eager": True, "gpu_memory_utilization": 0.1}
    common = [f"model={model_dir}", f"distill.input={prompts_file}", f"distill.output_dir={out}/distilled",
              f"distill.max_tokens={args.max_tokens}", f"distill.engine_kwargs={json.dumps(engine)}",
              f"eval.num_prompts={args.eval_prompts}", f"eval.max_tokens={args.max_tokens}",
              f"eval.engine_kwargs={json.dumps(engine)}", f"train.storage_path={(out / 'ray_results').resolve()}",
              "export.overwrite=true"]

    # 1. The pipeline, training settings all default.
    cfg = build_config(overrides=common + ["train.run_name=defaults", f"export.output_dir={out}/export-defaults"])
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    summary = pipeline.run(cfg)
    defaults_time = time.perf_counter() - t0

    # 2. The textbook recipe on the same distilled rows, measured on the same held-back prompts.
    heldout = Path(cfg.distill.output_dir) / "_pipeline" / "heldout_prompts.jsonl"
    recipe_cfg = build_config(overrides=common + [
        "train.run_name=textbook", f"export.output_dir={out}/export-textbook", f"eval.prompts={heldout}",
        "train.epochs=2", "train.lr=1e-3", "train.warmup_ratio=0.1", "train.val_fraction=0"])
    t0 = time.perf_counter()
    recipe_train = train.run(recipe_cfg)
    recipe_time = time.perf_counter() - t0
    recipe_export = export.run(recipe_cfg, checkpoint=recipe_train.checkpoint)
    recipe_eval = evaluate.run(recipe_cfg, draft_dir=str(recipe_export.path))

    rows = [
        ("untrained heads", summary.acceptance_length_untrained, None, None),
        ("textbook: 2 epochs, lr 1e-3, cosine, warmup 0.1", recipe_eval["acceptance_length"],
         recipe_eval["speedup"], recipe_train.global_step),
        ("medusa-ray `pipeline`, training defaults", summary.acceptance_length, summary.speedup,
         summary.train_steps),
    ]
    print(f"\n{summary.rows_distilled} distilled rows, {args.eval_prompts} held-back prompts, "
          f"{args.max_tokens} tokens each; defaults' validation expected acceptance "
          f"{summary.expected_acceptance:.3f}; pipeline {defaults_time:.0f} s, textbook training {recipe_time:.0f} s\n")
    print("| training | acceptance length (vLLM) | speed-up | optimizer steps |")
    print("| --- | --- | --- | --- |")
    for name, acc, speed, steps in rows:
        cells = [f"{acc:.3f}" if acc is not None else "-", f"{speed:.2f}×" if speed is not None else "-",
                 str(steps) if steps is not None else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    (out / "results.json").write_text(json.dumps({
        "rows_distilled": summary.rows_distilled, "eval_prompts": args.eval_prompts,
        "max_tokens": args.max_tokens, "expected_acceptance": summary.expected_acceptance,
        "untrained": summary.acceptance_length_untrained,
        "textbook": {"acceptance_length": recipe_eval["acceptance_length"], "speedup": recipe_eval["speedup"],
                     "steps": recipe_train.global_step},
        "defaults": {"acceptance_length": summary.acceptance_length, "speedup": summary.speedup,
                     "steps": summary.train_steps},
    }, indent=2))
    print(f"\nwritten {out / 'results.json'}")


if __name__ == "__main__":
    main()
