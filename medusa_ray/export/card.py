"""The export's ``README.md``: what the heads are, what they were trained on, how well they do, how to serve them.

Rendered only from files inside the export dir (``medusa_ray_export.json`` and, once ``eval`` has run on
it, ``eval_results.json``), so ``evaluate`` can refresh it after measuring acceptance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medusa_ray.export.writer import COMPARISON_FILE, EVAL_FILE, MARKER_FILE, is_local_path

_METRIC = re.compile(r"^(?:medusa|eagle3_step)(\d+)_(loss|top\d+|accept)$")


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
        ("tokens/s with the draft", results.get("tokens_per_s_medusa")),
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
    lines = ["## Medusa or EAGLE-3?", "",
             f"Trained on the same distilled data and measured by vLLM on the same held-back prompts. {verdict}", "",
             "| drafter | validation estimate | acceptance length | untrained | speed-up | training tokens/s |",
             "|---|---|---|---|---|---|"]
    for method, c in comparison["drafters"].items():
        cells = [_fmt(c.get(k)) if c.get(k) is not None else "-" for k in
                 ("expected_acceptance", "acceptance_length", "acceptance_length_untrained", "speedup",
                  "train_tokens_per_s")]
        lines.append(f"| {'**' + method + '**' if method == fastest else method} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_model_card(marker: dict[str, Any], results: dict[str, Any] | None,
                      comparison: dict[str, Any] | None = None) -> str:
    meta = marker["meta"]
    base = marker["base_model"]
    eagle3 = meta.get("method") == "eagle3"
    data = meta.get("data") or {}
    train_cfg = (meta.get("config") or {}).get("train", {})
    front = ["---", "tags:", "- eagle3" if eagle3 else "- medusa", "- speculative-decoding", "- medusa-ray"]
    if not is_local_path(base):
        front.append(f"base_model: {base}")
    front.append("---")
    if eagle3:
        lines = front + [
            "",
            f"# EAGLE-3 draft for `{base}`",
            "",
            f"One decoder layer trained with medusa-ray on the base model's own outputs. It reads the base's hidden "
            f"states at layers {meta['eagle3_layer_ids']} and drafts {meta['eagle3_ttt_steps']} tokens a step from "
            f"a vocabulary of the {meta['eagle3_draft_vocab_size']} tokens the base most often says; the base "
            "verifies them. Greedy outputs are unchanged; decoding gets faster when drafts are accepted.",
            "",
            "Files: `config.json` and `model.safetensors` in the layout of vLLM's `speculators` library "
            "(`speculators_model_type: eagle3`, with the `d2t`/`t2d` vocabulary maps), which vLLM loads directly.",
        ]
    else:
        lines = front + [
            "",
            f"# Medusa heads for `{base}`",
            "",
            f"{meta['medusa_num_heads']} Medusa heads ({meta['medusa_num_layers']} residual block(s) each) trained "
            "with medusa-ray on the base model's own outputs. Head k predicts the token k+2 positions ahead; the "
            "base model's `lm_head` still predicts the next one. Greedy outputs are unchanged; decoding gets "
            "faster when drafts are accepted.",
            "",
            "Files: `medusa_lm_head.safetensors` (FasterDecoding/TGI layout: `{k}.{j}.linear.weight|bias`, "
            "`{k}.{L}.weight`), `config.json` (read by both vLLM and TGI), the base model's tokenizer.",
        ]
    if meta.get("share_lm_head"):
        lines += ["", "These heads were trained with `share_lm_head`: each head projects through the frozen base "
                  "`lm_head`. Both servers expect one vocab projection per head, so `{k}.{L}.weight` holds a copy "
                  "of the base `lm_head` for every head."]
    lines += ["", "## Data", "", "| | |", "|---|---|",
              f"| base model | `{base}` |",
              f"| source | `{data.get('source', 'unknown')}` |",
              f"| rows | {data.get('rows', 'unknown')} |",
              f"| tokens | {data.get('tokens', 'unknown')} |", ""]
    lines += ["## Training", "", "| | |", "|---|---|",
              f"| optimizer steps | {meta['global_step']} |",
              f"| DeepSpeed ZeRO stage | {meta['zero_stage']} |",
              f"| workers | {meta['world_size']} |"]
    drafter_keys = ("eagle3_ttt_steps", "eagle3_draft_vocab_size") if eagle3 else (
        "medusa_num_heads", "medusa_num_layers", "share_lm_head")
    for key in drafter_keys + ("head_decay", "lr", "batch_size", "grad_accum", "max_length", "warmup_ratio",
                               "max_steps", "epochs", "weight_decay", "seed"):
        if train_cfg.get(key) is not None:
            lines.append(f"| {key} | {train_cfg[key]} |")
    unit = "draft step" if eagle3 else "head"
    lines += ["", f"Final metrics per {unit} (last training step):", ""]
    lines += _head_metrics_table(meta.get("metrics") or {}, "step" if eagle3 else "head")
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
        lines += _comparison_section(comparison, "eagle3" if eagle3 else "medusa")
    lines += _serve_section(marker, eagle3)
    return "\n".join(lines)


def _serve_section(marker: dict[str, Any], eagle3: bool) -> list[str]:
    meta, base, location = marker["meta"], marker["base_model"], marker["location"]
    k = meta["eagle3_ttt_steps"] if eagle3 else meta["medusa_num_heads"]
    speculative = json.dumps({"method": "eagle3" if eagle3 else "medusa", "model": location,
                              "num_speculative_tokens": k})
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
    if eagle3:
        return lines + ["TGI does not serve EAGLE drafts; for TGI, train Medusa heads (`train.method=medusa`).", ""]
    lines += [
        "TGI (loads the base model from `base_model_name_or_path` in `config.json`):",
        "",
        "```bash",
    ]
    if is_local_path(location):
        lines.append(f"docker run --gpus all --shm-size 1g -p 8080:80 -v {location}:/medusa "
                     f"-v {base}:{base} ghcr.io/huggingface/text-generation-inference:latest --model-id /medusa"
                     if is_local_path(base) else
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
    path = export_dir / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(render_model_card(marker, results, comparison))
    tmp.replace(path)
    return path
