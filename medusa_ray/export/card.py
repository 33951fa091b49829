"""The export's ``README.md``: what the drafter is, what it was trained on, how well it does, how to serve it.

Rendered only from files inside the export dir (``medusa_ray_export.json`` and, once ``eval`` has run on
it, ``eval_results.json``), so ``evaluate`` can refresh it after measuring acceptance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medusa_ray import drafters
from medusa_ray.export.files import CARD_FILE, COMPARISON_FILE, EVAL_FILE, MARKER_FILE
from medusa_ray.paths import looks_local

BENCH_FILE = "bench_results.json"
"""Written by ``pipeline`` (with ``eval.bench``) into each export it benchmarked: the load benchmark's numbers
(no paths, no outputs), which the card shows as a table against concurrency."""

_METRIC = re.compile(r"^\w*?(\d+)_(loss|top\d+|accept)$")  # a drafter's per-position metric, position k


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _head_metrics_table(metrics: dict[str, Any], label: str = "head") -> list[str]:
    per_head: dict[int, dict[str, Any]] = {}
    for key, value in metrics.items():
        if m := _METRIC.match(key):
            per_head.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not per_head:
        return ["No per-head metrics were recorded."]
    columns = sorted({c for row in per_head.values() for c in row}, key=lambda c: (c != "loss", len(c), c))
    lines = [f"| {label} | predicts | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for k in sorted(per_head):
        cells = [_fmt(per_head[k].get(c, "")) for c in columns]
        lines.append(f"| {k} | token t+{k + 2} | " + " | ".join(cells) + " |")
    return lines


def _eval_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Acceptance (vLLM speculative decoding, greedy)", ""]
    rows = [
        ("mean acceptance length (tokens per verification step)", results.get("acceptance_length")),
        ("acceptance rate per position", results.get("accepted_per_position")),
        ("drafts", results.get("num_drafts")),
        ("tokens/s without speculation", results.get("tokens_per_s_base")),
        ("tokens/s with the draft", results.get("tokens_per_s_draft", results.get("tokens_per_s_medusa"))),
        ("speed-up", results.get("speedup")),
        ("outputs identical to plain decoding", results.get("outputs_identical")),
        ("prompts", results.get("num_prompts")),
    ]
    lines += ["| measure | value |", "|---|---|"]
    for name, value in rows:
        if value is not None:
            shown = ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else _fmt(value)
            lines.append(f"| {name} | {shown} |")
    accuracy = results.get("head_accuracy")
    if accuracy:
        topk = len(next(iter(accuracy.values())))
        lines += ["", "Teacher-forced accuracy on held-out conversations:", "",
                  "| head | " + " | ".join(f"top-{i + 1}" for i in range(topk)) + " |", "|---" * (topk + 1) + "|"]
        for head, accs in accuracy.items():
            lines.append(f"| {head} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    return lines + [""]


def _comparison_section(comparison: dict[str, Any], this: str) -> list[str]:
    fastest = comparison["fastest"]
    verdict = "This draft was the faster." if fastest == this else f"`{fastest}` was faster; this is `{this}`."
    lines = ["## Which drafter?", "",
             f"Trained on the same distilled data and measured by vLLM on the same held-back prompts. {verdict}", "",
             "| drafter | validation estimate | acceptance length | untrained | speed-up | training tokens/s |",
             "|---|---|---|---|---|---|"]
    for method, c in comparison["drafters"].items():
        cells = [_fmt(c.get(k)) if c.get(k) is not None else "-" for k in
                 ("expected_acceptance", "acceptance_length", "acceptance_length_untrained", "speedup",
                  "train_tokens_per_s")]
        lines.append(f"| {'**' + method + '**' if method == fastest else method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _bench_section(bench: dict[str, Any]) -> list[str]:
    """The load benchmark for this drafter: speed-up against concurrency, where it stops paying, and a plain
    sentence when no drafter beats plain decoding at the target load."""
    this, target = bench["this"], bench.get("target_concurrency")
    mine = bench["drafters"].get(this) or {}
    lines = ["## Under load (Ray Serve LLM, `openai` client)", "",
             f"Streamed greedy chat requests, {bench.get('max_tokens')} tokens each, at each number of concurrent "
             "clients, to the plain base and to the base with this drafter (same prompts, same seeds).", "",
             "| clients | tokens/s base | tokens/s with the drafter | speed-up | TTFT p50 ms | ITL p50 ms | "
             "outputs identical |", "|---|---|---|---|---|---|---|"]
    for level in sorted(bench["levels"], key=lambda lv: lv["concurrency"]):
        base, draft = level["models"].get("base") or {}, level["models"].get(this) or {}

        def cell(row: dict, key: str) -> str:
            return "-" if row.get(key) is None else _fmt(row[key])

        lines.append(f"| {level['concurrency']} | {cell(base, 'tokens_per_s')} | {cell(draft, 'tokens_per_s')} | "
                     f"{cell(draft, 'speedup')} | {cell(draft, 'ttft_p50_ms')} | {cell(draft, 'itl_p50_ms')} | "
                     f"{cell(draft, 'identical')} |")
    lines.append("")
    accept = mine.get("acceptance_length")
    if accept is not None:
        lines.append(f"Acceptance length under load (vLLM's spec-decode counters): {accept:.3f}.")
    where = mine.get("stops_paying_at")
    lines.append(f"This drafter stops paying at {where} concurrent clients: from there on, plain decoding is as "
                 "fast or faster." if where is not None else
                 "This drafter was faster than plain decoding at every concurrency measured.")
    best = bench.get("best_at_target")
    if target is not None:
        at = mine.get("speedup_at_target")
        shown = f"{at:.2f}x" if at is not None else "not measured"
        if best is None:
            lines.append(f"**At the target load ({target} concurrent clients) no drafter beats plain decoding** "
                         f"(this one: {shown}): serve the base without speculation there.")
        elif best == this:
            lines.append(f"At the target load ({target} concurrent clients) this is the fastest drafter ({shown}).")
        else:
            lines.append(f"At the target load ({target} concurrent clients) `{best}` is faster; this one: {shown}.")
    return lines + [""]


def render_model_card(marker: dict[str, Any], results: dict[str, Any] | None,
                      comparison: dict[str, Any] | None = None, bench: dict[str, Any] | None = None) -> str:
    meta = marker["meta"]
    base = marker["base_model"]
    drafter = drafters.get(meta.get("method", "medusa"))
    data = meta.get("data") or {}
    train_cfg = (meta.get("config") or {}).get("train", {})
    front = ["---", "tags:", f"- {drafter.method}", "- speculative-decoding", "- medusa-ray"]
    if not looks_local(base):
        front.append(f"base_model: {base}")
    front.append("---")
    lines = front + [""] + drafter.card(meta, base)
    lines += ["", "## Data", "", "| | |", "|---|---|",
              f"| base model | `{base}` |",
              f"| source | `{data.get('source', 'unknown')}` |",
              f"| rows | {data.get('rows', 'unknown')} |",
              f"| tokens | {data.get('tokens', 'unknown')} |", ""]
    lines += ["## Training", "", "| | |", "|---|---|",
              f"| optimizer steps | {meta['global_step']} |",
              f"| DeepSpeed ZeRO stage | {meta['zero_stage']} |",
              f"| workers | {meta['world_size']} |"]
    for key in drafter.card_keys() + ("head_decay", "lr", "batch_size", "grad_accum", "max_length", "warmup_ratio",
                               "max_steps", "epochs", "weight_decay", "seed"):
        if train_cfg.get(key) is not None:
            lines.append(f"| {key} | {train_cfg[key]} |")
    unit = "draft step" if drafter.position == "step" else drafter.position
    lines += ["", f"Final metrics per {unit} (last training step):", ""]
    lines += _head_metrics_table(meta.get("metrics") or {}, drafter.position)
    lines += [""]
    validation = meta.get("validation")
    if validation:
        top1 = " / ".join(f"{a:.3f}" for a in validation["top1"])
        lines += [f"On {validation['rows']} held-back conversations at step {validation['step']}: top-1 per {unit} "
                  f"{top1}, expected acceptance length {validation['expected_acceptance']:.3f} (an estimate of "
                  "what vLLM measures: `1 + sum_k prod_(i<=k) p_i`).", ""]
    if results:
        lines += _eval_section(results)
    if comparison:
        lines += _comparison_section(comparison, drafter.method)
    if bench:
        lines += _bench_section(bench)
    lines += _serve_section(marker, drafter)
    if marker.get("base_is_local"):
        lines += [f"The base model was a local directory, published here as `{base}`: give vLLM your copy of it "
                  "(`--model`), and, for TGI, set `base_model_name_or_path` in `config.json` to its path or Hub id.",
                  ""]
    return "\n".join(lines)


class _MetaKeys:
    """A checkpoint meta read as the ``train`` section its drafter's keys come from."""

    def __init__(self, meta: dict[str, Any]):
        self.__dict__.update(meta)


def _serve_section(marker: dict[str, Any], drafter) -> list[str]:
    meta, base, location = marker["meta"], marker["base_model"], marker["location"]
    k = drafter.num_positions(_MetaKeys(meta))
    speculative = json.dumps(drafter.speculative_config(location, k))
    lines = [
        "## Serve it",
        "",
        "vLLM (Python):",
        "",
        "```python",
        "from vllm import LLM, SamplingParams",
        f"llm = LLM(model={json.dumps(base)}, speculative_config={speculative})",
        'print(llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text)',
        "```",
        "",
        "vLLM (OpenAI-compatible server):",
        "",
        "```bash",
        f"vllm serve {base} --speculative-config '{speculative}'",
        "```",
        "",
    ]
    if not drafter.serves_with_tgi:
        return lines + [f"TGI does not serve this drafter ({drafter.title}); for TGI, train Medusa heads "
                        "(`train.method=medusa`).", ""]
    lines += [
        "TGI (loads the base model from `base_model_name_or_path` in `config.json`):",
        "",
        "```bash",
    ]
    if looks_local(location):
        lines.append(f"docker run --gpus all --shm-size 1g -p 8080:80 -v {location}:/medusa "
                     f"-v {base}:{base} ghcr.io/huggingface/text-generation-inference:latest --model-id /medusa"
                     if looks_local(base) else
                     f"docker run --gpus all --shm-size 1g -p 8080:80 -v {location}:/medusa "
                     "ghcr.io/huggingface/text-generation-inference:latest --model-id /medusa")
    else:
        lines.append("docker run --gpus all --shm-size 1g -p 8080:80 -e HF_TOKEN "
                     f"ghcr.io/huggingface/text-generation-inference:latest --model-id {location}")
    lines += ["```", ""]
    return lines


def write_model_card(export_dir: str | Path) -> Path:
    """(Re)write ``README.md`` of an export from its marker and, if present, its ``eval_results.json``."""
    export_dir = Path(export_dir)
    marker = json.loads((export_dir / MARKER_FILE).read_text())
    results = comparison = None
    if (export_dir / EVAL_FILE).is_file():
        results = json.loads((export_dir / EVAL_FILE).read_text())
    if (export_dir / COMPARISON_FILE).is_file():
        comparison = json.loads((export_dir / COMPARISON_FILE).read_text())
    bench = json.loads((export_dir / BENCH_FILE).read_text()) if (export_dir / BENCH_FILE).is_file() else None
    path = export_dir / CARD_FILE
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_model_card(marker, results, comparison, bench))
    tmp.replace(path)
    return path
