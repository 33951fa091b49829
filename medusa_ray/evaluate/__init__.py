"""evaluate: does Medusa make *this* model faster? Acceptance length and speed-up through vLLM.

    medusa-ray eval --model BASE --medusa HEADS_DIR --prompts FILE [--num-prompts N] [--max-tokens M]
                    [--heldout PARQUET] [--output-json PATH] [--plot PNG]

The same prompts go through one plain vLLM engine and one with ``speculative_config={"method": "medusa",
...}``, both greedy. Speculative decoding must not change greedy outputs, so any difference is reported
as an error. Acceptance comes from vLLM's own counters: mean acceptance length = tokens emitted per
verification step = 1 + accepted / drafts. When the Medusa dir is a medusa-ray export, the results are
also saved there as ``eval_results.json`` and its model card is refreshed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from medusa_ray import progress
from medusa_ray.config import Config
from medusa_ray.paths import check_local_model
from medusa_ray.errors import UserError
from medusa_ray.writable import check_writable
from medusa_ray.data import read_prompts
from medusa_ray.data.chat import Prompt

__all__ = ["run"]

log = logging.getLogger(__name__)

_DRAFTS = "vllm:spec_decode_num_drafts"
_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def _drafter(draft_dir: Path) -> dict[str, Any]:
    """What an export directory holds: ``method`` (medusa | eagle3), ``steps`` (the most tokens it drafts a
    step), ``base`` (the base model it was exported for) and its ``config``."""
    path = draft_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{draft_dir} is not a drafter directory: it has no config.json (run `medusa-ray export`)")
    config = json.loads(path.read_text())
    if config.get("speculators_model_type") == "eagle3":
        proposal = (config.get("speculators_config") or {}).get("proposal_methods") or [{}]
        verifier = (config.get("speculators_config") or {}).get("verifier") or {}
        return {"method": "eagle3", "steps": int(proposal[0].get("speculative_tokens") or 3),
                "base": verifier.get("name_or_path"), "config": config}
    if "medusa_num_heads" in config:
        return {"method": "medusa", "steps": int(config["medusa_num_heads"]),
                "base": config.get("base_model_name_or_path"), "config": config}
    raise UserError(f"{path}: neither Medusa heads (medusa_num_heads) nor an EAGLE-3 draft "
                    "(speculators_model_type: eagle3)")


def _engine_kwargs(cfg: Config) -> dict[str, Any]:
    import torch

    from medusa_ray.cluster import verbose

    kwargs: dict[str, Any] = {"seed": 0, "use_tqdm_on_load": verbose()}
    if not torch.cuda.is_available():
        # vLLM on CPU: the KV cache is a fraction of RAM, and graph capture buys nothing.
        kwargs.update(gpu_memory_utilization=0.1, enforce_eager=True)
    kwargs.update(cfg.eval.engine_kwargs)
    return kwargs


def _generate(llm, prompts: list[Prompt], max_tokens: int, progress=False):
    """Greedy outputs and wall time of one batch (chat prompts through the chat template); ``progress`` is
    vLLM's ``use_tqdm``."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    chats = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    outputs: dict[int, list[int]] = {}
    start = time.perf_counter()
    if chats:
        for i, out in zip(chats, llm.chat([prompts[i] for i in chats], params, use_tqdm=progress)):
            outputs[i] = list(out.outputs[0].token_ids)
    if texts:
        for i, out in zip(texts, llm.generate([prompts[i] for i in texts], params, use_tqdm=progress)):
            outputs[i] = list(out.outputs[0].token_ids)
    elapsed = time.perf_counter() - start
    return [outputs[i] for i in range(len(prompts))], elapsed


def _spec_counters(llm) -> dict[str, Any]:
    counters: dict[str, Any] = {_DRAFTS: 0, _DRAFT_TOKENS: 0, _ACCEPTED: 0, _PER_POS: []}
    for metric in llm.get_metrics():
        if metric.name in (_DRAFTS, _DRAFT_TOKENS, _ACCEPTED):
            counters[metric.name] += metric.value
        elif metric.name == _PER_POS:
            values = list(metric.values)
            old = counters[_PER_POS]
            counters[_PER_POS] = [a + b for a, b in zip(values, old + [0] * (len(values) - len(old)))]
    return counters


def _run_engine(base: str, prompts: list[Prompt], max_tokens: int, kwargs: dict[str, Any],
                speculative: dict[str, Any] | None, progress=False):
    """One engine's outputs, time and spec-decode counter deltas; the engine is torn down before returning."""
    from vllm import LLM

    llm = LLM(model=base, speculative_config=speculative, disable_log_stats=False, **kwargs)
    try:
        _generate(llm, prompts[:1], 4)  # warm-up, so the timed run measures decoding, not first-call setup
        before = _spec_counters(llm)
        outputs, elapsed = _generate(llm, prompts, max_tokens, progress)
        after = _spec_counters(llm)
    finally:
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm, engine
        gc.collect()
    delta = {k: after[k] - before[k] for k in (_DRAFTS, _DRAFT_TOKENS, _ACCEPTED)}
    per_pos = after[_PER_POS]
    delta[_PER_POS] = [a - b for a, b in zip(per_pos, before[_PER_POS] + [0] * (len(per_pos) - len(before[_PER_POS])))]
    return outputs, elapsed, delta


def _acceptance(counters: dict[str, Any], k: int) -> dict[str, Any]:
    """Mean acceptance length (tokens per verification step) and acceptance rate per draft position."""
    drafts = int(counters[_DRAFTS])
    accepted = int(counters[_ACCEPTED])
    return {
        "acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
        "accepted_per_position": [a / drafts if drafts else 0.0 for a in counters[_PER_POS]][:k],
        "num_drafts": drafts,
    }


def _compare(base_out: list[list[int]], spec_out: list[list[int]]) -> list[dict[str, Any]]:
    errors = []
    for i, (a, b) in enumerate(zip(base_out, spec_out)):
        if a != b:
            first = next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            errors.append({"prompt": i, "error": "output differs from plain greedy decoding", "first_diff_token": first})
    return errors


def _print_table(results: dict[str, Any]) -> None:
    rows = [
        ("prompts", results["num_prompts"]),
        ("speculative tokens", results["num_speculative_tokens"]),
        ("acceptance length", f"{results['acceptance_length']:.3f}"),
        ("accepted per position", " ".join(f"{a:.3f}" for a in results["accepted_per_position"])),
        ("drafts", results["num_drafts"]),
        ("tokens/s base", f"{results['tokens_per_s_base']:.1f}"),
        (f"tokens/s {results.get('method', 'medusa')}", f"{results['tokens_per_s_medusa']:.1f}"),
        ("speed-up", f"{results['speedup']:.2f}x"),
        ("outputs identical", "yes" if results["outputs_identical"]
         else f"ERROR: {len(results['errors'])} prompt(s) differ"),
    ]
    for name, other in results.get("compared", {}).items():
        rows.append((f"acceptance length ({name})", f"{other['acceptance_length']:.3f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    accuracy = results.get("head_accuracy")
    if accuracy:
        topk = len(next(iter(accuracy.values())))
        print(f"\nper-head accuracy ({results['heldout_positions']} held-out positions)")
        print("head    " + "".join(f"  top-{i + 1:<3}" for i in range(topk)))
        for head, accs in accuracy.items():
            print(f"{head:<8}" + "".join(f"  {a:6.3f}" for a in accs))


def run(cfg: Config, medusa_dir: str | None = None, compare_untrained: bool = False) -> dict[str, Any]:
    """Decode ``eval.prompts`` with and without the Medusa heads in ``medusa_dir`` (default ``export.output_dir``).

    With ``compare_untrained``, heads of the same shape as training starts them (each a copy of the base
    ``lm_head``) get their own speculative run against the same baseline, reported under ``compared``.
    Both vLLM engines run in one Ray task on a worker node when Ray is up (a GPU when the cluster has or can
    add one), never in the job driver on the head.
    """
    from medusa_ray.cluster import resolve_accelerator, run_task

    medusa_path = Path(medusa_dir or cfg.export.output_dir).expanduser().resolve()
    drafter = _drafter(medusa_path)
    k = cfg.eval.num_speculative_tokens or drafter["steps"]
    if drafter["method"] == "medusa" and k > drafter["steps"]:
        raise UserError(f"eval.num_speculative_tokens={k} but {medusa_path} has only {drafter['steps']} heads")
    if not cfg.eval.prompts:
        raise UserError("eval.prompts is not set: pass --prompts FILE")
    if cfg.eval.output_json:
        check_writable(Path(cfg.eval.output_json).expanduser().parent, "eval.output_json")
    import ray

    gpus = 0
    if ray.is_initialized() and resolve_accelerator(cfg.eval.accelerator, "eval.accelerator") == "gpu":
        engine = cfg.eval.engine_kwargs
        gpus = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    board = progress.board("eval", "prompts", lambda s: (s["done"], s["total"], "")) if ray.is_initialized() \
        else contextlib.nullcontext()
    with board as handle:
        results = run_task(measure, cfg.to_dict(), str(medusa_path), compare_untrained, handle,
                           name="medusa-ray-eval", num_cpus=1, num_gpus=gpus)
    if results["errors"]:
        log.error("%d of %d outputs differ from plain greedy decoding", len(results["errors"]), results["num_prompts"])
    _print_table(results)  # first: the numbers are on screen even if writing them fails
    _save(results, medusa_path, cfg.eval.output_json)
    return results


def measure(cfg_dict: dict[str, Any], medusa_dir: str, compare_untrained: bool, board=None) -> dict[str, Any]:
    """Both engines, the comparison, per-head accuracy and the plot; ``run`` saves the results. Prompts done
    are posted to ``board`` (``medusa_ray.progress.Board``) for the driver's bar."""
    import tempfile

    from medusa_ray import logs
    from medusa_ray.cluster import node_id

    logs.configure_vllm()
    cfg = Config.model_validate(cfg_dict)
    medusa_path = Path(medusa_dir)
    drafter = _drafter(medusa_path)
    k = cfg.eval.num_speculative_tokens or drafter["steps"]
    # --model wins; otherwise the base the draft was exported for.
    base = cfg.model if "model" in cfg.model_fields_set else drafter["base"] or cfg.model
    check_local_model(base)
    prompts = read_prompts(cfg.eval.prompts, cfg.eval.num_prompts, cfg.distill.mode)

    kwargs = _engine_kwargs(cfg)
    runs = 3 if compare_untrained else 2
    log.info("decoding %d prompts without Medusa", len(prompts))
    base_out, base_time, _ = _run_engine(base, prompts, cfg.eval.max_tokens, kwargs, None,
                                         _posting(board, 0, runs * len(prompts)))
    speculative = {"method": drafter["method"], "model": str(medusa_path), "num_speculative_tokens": k}
    log.info("decoding %d prompts with Medusa (%d speculative tokens)", len(prompts), k)
    spec_out, spec_time, counters = _run_engine(base, prompts, cfg.eval.max_tokens, kwargs, speculative,
                                                _posting(board, len(prompts), runs * len(prompts)))

    compared = {}
    if compare_untrained:
        with tempfile.TemporaryDirectory(prefix="medusa-untrained-") as tmp:
            other = (untrained_draft(medusa_path, base, Path(tmp)) if drafter["method"] == "eagle3"
                     else untrained_heads(medusa_path, Path(tmp)))
            log.info("decoding %d prompts with untrained Medusa heads", len(prompts))
            other_out, _, other_counters = _run_engine(base, prompts, cfg.eval.max_tokens, kwargs,
                                                       {**speculative, "model": str(other)},
                                                       _posting(board, 2 * len(prompts), runs * len(prompts)))
        compared["untrained"] = _acceptance(other_counters, k)
        compared["untrained"]["outputs_identical"] = not _compare(base_out, other_out)

    accepted = int(counters[_ACCEPTED])
    errors = _compare(base_out, spec_out)
    base_tokens = sum(len(o) for o in base_out)
    spec_tokens = sum(len(o) for o in spec_out)
    tps_base = base_tokens / base_time if base_time > 0 else 0.0
    tps_medusa = spec_tokens / spec_time if spec_time > 0 else 0.0
    results: dict[str, Any] = {
        "base_model": base,
        "medusa_dir": str(medusa_path),
        "num_prompts": len(prompts),
        "max_tokens": cfg.eval.max_tokens,
        "num_speculative_tokens": k,
        **_acceptance(counters, k),
        "num_draft_tokens": int(counters[_DRAFT_TOKENS]),
        "num_accepted_tokens": accepted,
        "output_tokens": spec_tokens,
        "tokens_per_s_base": tps_base,
        "tokens_per_s_medusa": tps_medusa,
        "speedup": tps_medusa / tps_base if tps_base else 0.0,
        "outputs_identical": not errors,
        "errors": errors,
        "node_id": node_id(),
    }
    if compared:
        results["compared"] = compared
    results["method"] = drafter["method"]
    if cfg.eval.heldout and drafter["method"] == "medusa":  # teacher-forced accuracy per Medusa head
        from medusa_ray.evaluate.accuracy import head_accuracy

        results["head_accuracy"], results["heldout_positions"] = head_accuracy(
            base, medusa_path, cfg.eval.heldout, cfg.train.topk, cfg.eval.num_prompts, cfg.train.max_length)
    if cfg.eval.plot:
        from medusa_ray.evaluate.plot import plot_results

        results["plot"] = str(plot_results(results, cfg.eval.plot))
    return results


def _posting(board, done_before: int, total: int):
    """vLLM's ``use_tqdm`` for one run: a tqdm that draws nothing and posts the prompts done to ``board``."""
    if board is None:
        return False
    import os

    from tqdm import tqdm

    class PostingTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            # vLLM also uses it while rendering prompts; only the decoding bar counts prompts done.
            self._posts = kwargs.get("desc") == "Processed prompts"
            super().__init__(*args, **{**kwargs, "file": open(os.devnull, "w")})

        def update(self, n=1):
            shown = super().update(n)
            if self._posts:
                board.post.remote({"done": done_before + self.n, "total": total})
            return shown

    return PostingTqdm


def untrained_draft(export_dir: Path, base: str, out: Path) -> Path:
    """An EAGLE-3 draft of the export's shape (same layers and vocabulary maps) as training starts it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from medusa_ray.model.eagle3 import build_draft

    config = json.loads((export_dir / "config.json").read_text())
    tensors = load_file(str(export_dir / "model.safetensors"))
    proposal = config["speculators_config"]["proposal_methods"][0]
    draft = build_draft(base, AutoConfig.from_pretrained(base), list(config["eagle_aux_hidden_state_layer_ids"]),
                        tensors.get("d2t"), tensors.get("t2d"), int(config["draft_vocab_size"]),
                        int(proposal["speculative_tokens"]))
    draft.to(next(t.dtype for t in tensors.values() if t.is_floating_point())).save_pretrained(out)
    return out


def untrained_heads(export_dir: Path, out: Path) -> Path:
    """Heads of the export's shape as training starts them (each one a copy of the base lm_head)."""
    from safetensors.torch import load_file, save_file

    from medusa_ray.export.writer import WEIGHTS_FILE, base_lm_head
    from medusa_ray.model.heads import MedusaHeads

    config = json.loads((export_dir / "config.json").read_text())
    trained = load_file(export_dir / WEIGHTS_FILE)
    heads = MedusaHeads(config["medusa_num_heads"], config["medusa_num_layers"],
                        base_lm_head(config["base_model_name_or_path"]))
    dtype = next(iter(trained.values())).dtype
    tensors = {k: v.to(dtype).contiguous() for k, v in heads.state_dict().items()}
    if tensors.keys() != trained.keys():
        raise UserError(f"{export_dir}: heads are not in the layout untrained heads are built in")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _save(results: dict[str, Any], medusa_path: Path, output_json: str | None) -> None:
    from medusa_ray.export import EVAL_FILE, MARKER_FILE, write_model_card
    from medusa_ray.export.public import public_eval

    targets = [(Path(output_json).expanduser(), results)] if output_json else []
    if (medusa_path / MARKER_FILE).is_file():
        # The export may be pushed to a public repo: only the numbers go there, not outputs or paths.
        targets.append((medusa_path / EVAL_FILE, public_eval(results)))
    for path, content in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        tmp.replace(path)
    if (medusa_path / MARKER_FILE).is_file():
        write_model_card(medusa_path)
