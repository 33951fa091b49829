"""evaluate: does the drafter make *this* model faster? Acceptance length and speed-up through vLLM.

    medusa-ray eval --prompts FILE [--draft DIR] [--model BASE] [--num-prompts N] [--max-tokens M]
                    [--heldout PARQUET] [--output-json PATH] [--plot PNG]

The same prompts go through one plain vLLM engine and one with the drafter's ``speculative_config`` (which
drafter a directory holds, and how vLLM runs it, is the drafter module's answer), both greedy. Speculative
decoding must not change greedy outputs, so any difference is reported as an error. Acceptance comes from
vLLM's own counters: mean acceptance length = tokens emitted per verification step = 1 + accepted / drafts.
When the directory is a medusa-ray export, the results are also saved there as ``eval_results.json`` and its
model card is refreshed. ``run`` returns an ``EvalResult``; its ``summary()`` is what the CLI prints.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from medusa_ray import compat, drafters, progress
from medusa_ray.config import Config
from medusa_ray.data import Prompt, read_prompts
from medusa_ray.errors import UserError
from medusa_ray.paths import check_local_model
from medusa_ray.writable import check_writable

__all__ = ["run", "EvalResult"]

log = logging.getLogger(__name__)

_DRAFTS = "vllm:spec_decode_num_drafts"
_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def _engine_kwargs(cfg: Config) -> dict[str, Any]:
    import torch

    from medusa_ray.logs import verbose

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
        compat.shutdown_llm(llm)
        del llm
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


class EvalResult(dict):
    """Eval's results: the JSON ``eval.output_json`` gets (a dict), plus ``summary()``, the table the CLI prints.

    ``draft_dir`` and ``tokens_per_s_draft`` are also written under their medusa-ray 0.1 names, ``medusa_dir``
    and ``tokens_per_s_medusa``, for one more release."""

    def summary(self) -> str:
        return _table(self)


def _table(results: dict[str, Any]) -> str:
    rows = [
        ("prompts", results["num_prompts"]),
        ("speculative tokens", results["num_speculative_tokens"]),
        ("acceptance length", f"{results['acceptance_length']:.3f}"),
        ("accepted per position", " ".join(f"{a:.3f}" for a in results["accepted_per_position"])),
        ("drafts", results["num_drafts"]),
        ("tokens/s base", f"{results['tokens_per_s_base']:.1f}"),
        (f"tokens/s {results['method']}", f"{results['tokens_per_s_draft']:.1f}"),
        ("speed-up", f"{results['speedup']:.2f}x"),
        ("outputs identical", "yes" if results["outputs_identical"]
         else f"ERROR: {len(results['errors'])} prompt(s) differ"),
    ]
    for name, other in results.get("compared", {}).items():
        rows.append((f"acceptance length ({name})", f"{other['acceptance_length']:.3f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    accuracy = results.get("head_accuracy")
    if accuracy:
        topk = len(next(iter(accuracy.values())))
        lines += ["", f"per-position accuracy ({results['heldout_positions']} held-out positions)",
                  "draft   " + "".join(f"  top-{i + 1:<3}" for i in range(topk))]
        lines += [f"{name:<8}" + "".join(f"  {a:6.3f}" for a in accs) for name, accs in accuracy.items()]
    return "\n".join(lines)


def run(cfg: Config, draft_dir: str | None = None, compare_untrained: bool = False,
        medusa_dir: str | None = None) -> EvalResult:
    """Decode ``eval.prompts`` with and without the drafter in ``draft_dir`` (default ``export.output_dir``).

    With ``compare_untrained``, a drafter of the same shape as training starts it gets its own speculative run
    against the same baseline, reported under ``compared``. Both vLLM engines run in one Ray task on a worker
    node when Ray is up (a GPU when the cluster has or can add one), never in the job driver on the head.
    ``medusa_dir`` is 0.1's name for ``draft_dir`` (deprecated).
    """
    from medusa_ray.cluster import resolve_accelerator, run_task

    if medusa_dir is not None:
        log.warning("evaluate.run(medusa_dir=...) is deprecated and will be removed after 0.2; use draft_dir=")
        draft_dir = draft_dir or medusa_dir
    draft_path = Path(draft_dir or cfg.export.output_dir).expanduser().resolve()
    drafter, found = drafters.detect(draft_path)
    k = cfg.eval.num_speculative_tokens or found["steps"]
    limit = drafter.max_speculative_tokens(found["steps"])
    if limit is not None and k > limit:
        raise UserError(f"eval.num_speculative_tokens={k} but {draft_path} drafts at most {limit} "
                        f"(a {drafter.title} export with {found['steps']} {drafter.position}s)")
    if not cfg.eval.prompts:
        raise UserError("eval.prompts is not set: pass --prompts FILE")
    if cfg.eval.output_json:
        check_writable(Path(cfg.eval.output_json).expanduser().parent, "eval.output_json")
    if _is_export(draft_path):  # eval writes its numbers and a fresh card into the export
        check_writable(draft_path, "--draft")
    # The base: ``model`` when the config sets it; otherwise the one the draft was exported for (its local path,
    # which the published files only name redacted, when the export was made on this machine).
    from medusa_ray.export import local_base

    base = cfg.model if "model" in cfg.model_fields_set else local_base(draft_path) or found["base"] or cfg.model
    import ray

    gpus = 0
    if ray.is_initialized() and resolve_accelerator(cfg.eval.accelerator, "eval.accelerator") == "gpu":
        from medusa_ray.preflight import prepare_engine

        # A base bigger than one GPU gets the tensor_parallel_size that fits (refused when none does, or when no
        # node has the tp x pp GPUs the task claims); both engines in the task use it.
        engine = prepare_engine(cfg.model_copy(update={"model": base}), "eval", cfg.eval.engine_kwargs, "gpu")
        if engine != cfg.eval.engine_kwargs:
            cfg = cfg.model_copy(deep=True)
            cfg.eval.engine_kwargs = engine
        gpus = int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))
    board = progress.board("eval", "prompts", lambda s: (s["done"], s["total"], "")) if ray.is_initialized() \
        else contextlib.nullcontext()
    with board as handle:
        results = EvalResult(run_task(measure, cfg.to_dict(), str(draft_path), base, compare_untrained, handle,
                                      name="medusa-ray-eval", num_cpus=1, num_gpus=gpus))
    if results["errors"]:
        log.error("%d of %d outputs differ from plain greedy decoding", len(results["errors"]), results["num_prompts"])
    try:
        _save(results, draft_path, cfg.eval.output_json)
    except OSError:
        print(results.summary(), flush=True)  # an hour of decoding is not lost to a full disk: the numbers first
        raise
    return results


def _is_export(path: Path) -> bool:
    from medusa_ray.export import read_marker

    return read_marker(path) is not None


def measure(cfg_dict: dict[str, Any], draft_dir: str, base: str, compare_untrained: bool, board=None
            ) -> dict[str, Any]:
    """Both engines, the comparison, per-head accuracy and the plot; ``run`` saves the results. Prompts done
    are posted to ``board`` (``medusa_ray.progress.Board``) for the driver's bar."""
    import tempfile

    from medusa_ray import logs
    from medusa_ray.cluster import node_id

    logs.configure_vllm()
    cfg = Config.model_validate(cfg_dict)
    draft_path = Path(draft_dir)
    drafter, found = drafters.detect(draft_path)
    k = cfg.eval.num_speculative_tokens or found["steps"]
    check_local_model(base)
    prompts = read_prompts(cfg.eval.prompts, cfg.eval.num_prompts, cfg.distill.mode)

    kwargs = _engine_kwargs(cfg)
    runs = 3 if compare_untrained else 2
    log.info("decoding %d prompts without speculation", len(prompts))
    base_out, base_time, _ = _run_engine(base, prompts, cfg.eval.max_tokens, kwargs, None,
                                         _posting(board, 0, runs * len(prompts)))
    speculative = drafter.speculative_config(str(draft_path), k)
    log.info("decoding %d prompts with the %s (%d speculative tokens)", len(prompts), drafter.title, k)
    spec_out, spec_time, counters = _run_engine(base, prompts, cfg.eval.max_tokens, kwargs, speculative,
                                                _posting(board, len(prompts), runs * len(prompts)))

    compared = {}
    if compare_untrained:
        with tempfile.TemporaryDirectory(prefix="medusa-untrained-") as tmp:
            other = drafter.untrained(draft_path, base, Path(tmp))
            log.info("decoding %d prompts with an untrained %s", len(prompts), drafter.title)
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
    tps_draft = spec_tokens / spec_time if spec_time > 0 else 0.0
    results: dict[str, Any] = {
        "base_model": base,
        "method": drafter.method,
        "draft_dir": str(draft_path),
        "num_prompts": len(prompts),
        "max_tokens": cfg.eval.max_tokens,
        "num_speculative_tokens": k,
        **_acceptance(counters, k),
        "num_draft_tokens": int(counters[_DRAFT_TOKENS]),
        "num_accepted_tokens": accepted,
        "output_tokens": spec_tokens,
        "tokens_per_s_base": tps_base,
        "tokens_per_s_draft": tps_draft,
        "speedup": tps_draft / tps_base if tps_base else 0.0,
        "outputs_identical": not errors,
        "errors": errors,
        "node_id": node_id(),
        # medusa-ray 0.1's names, kept for one more release.
        "medusa_dir": str(draft_path),
        "tokens_per_s_medusa": tps_draft,
    }
    if compared:
        results["compared"] = compared
    if cfg.eval.heldout:  # teacher-forced accuracy per draft position, where the drafter has such a measure
        accuracy = drafter.heldout_accuracy(base, draft_path, cfg.eval.heldout, cfg)
        if accuracy is not None:
            results["head_accuracy"], results["heldout_positions"] = accuracy
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


def _save(results: dict[str, Any], draft_path: Path, output_json: str | None) -> None:
    """The full results to ``eval.output_json``; into an export, only its numbers and a refreshed card."""
    from medusa_ray import export

    if output_json:
        path = Path(output_json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)
    if _is_export(draft_path):
        export.record_eval(draft_path, results)
