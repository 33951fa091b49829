"""What an export may tell the world: an allow-list of settings and numbers, with no paths or credentials.

An export directory is made to be pushed to the Hub, often to a public repo. The run config behind it holds
endpoint URLs, tracking URIs (which may carry a password), bucket names and home directories; none of that
belongs in a model card. So the files inside an export are built from an allow-list, and every location
that is kept (the base model, the data's and the checkpoint's names) goes through ``redact`` first.

``redact`` is ``medusa_ray.redact.public_location`` (shared with experiment tracking): an http(s) URL as its
scheme and public host only, buckets, IPs and internal hosts as a stable id, a local path as its last two
components less user names and IPs.
"""

from __future__ import annotations

from typing import Any

from medusa_ray import drafters
from medusa_ray.redact import public_location as redact
from medusa_ray.redact import source_id  # noqa: F401 - the export marker's checkpoint id

# Settings that describe how the drafter was made and say nothing about where: (section, key). Every registered
# drafter's own keys are shapes and counts (``_public_settings``).
_PUBLIC_SETTINGS: dict[str, tuple[str, ...]] = {
    "distill": ("mode", "temperature", "top_p", "max_tokens", "seed"),
    "train": ("method", "head_decay", "max_length", "num_workers", "zero_stage", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
              "warmup_steps", "max_steps", "epochs", "max_epochs", "min_steps", "step_budget", "patience",
              "val_fraction", "val_min_rows", "val_max_rows", "val_every", "seed"),
    "eval": ("num_prompts", "max_tokens", "num_speculative_tokens"),
}
_PUBLIC_META = ("format", "base_model", "method", "hidden_size", "vocab_size", "global_step", "zero_stage",
                "world_size", "metrics", "validation", "base_architectures")
_PUBLIC_DATA = ("rows", "tokens", "truncated", "epoch", "bad_rows")
_PUBLIC_EVAL = ("base_model", "num_prompts", "max_tokens", "num_speculative_tokens", "acceptance_length",
                "accepted_per_position", "num_drafts", "num_draft_tokens", "num_accepted_tokens", "output_tokens",
                "tokens_per_s_base", "tokens_per_s_draft", "tokens_per_s_medusa", "speedup", "outputs_identical", "head_accuracy",
                "heldout_positions", "method")
def public_config(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": redact(config.get("model"))}
    for section, keys in _public_settings().items():
        values = config.get(section) or {}
        out[section] = {k: values[k] for k in keys if k in values}
    return out


def _public_settings() -> dict[str, tuple[str, ...]]:
    own = tuple(k for name in drafters.names() for k in drafters.get(name).keys.model_fields)
    return {**_PUBLIC_SETTINGS, "train": _PUBLIC_SETTINGS["train"] + own}


def public_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's meta (``Meta.flat()``) as an export may carry it: the allow-list, and the drafter's own
    shape keys (numbers it describes itself by)."""
    out = {k: meta[k] for k in _PUBLIC_META if k in meta}
    if meta.get("method") in drafters.names():
        out.update({k: meta[k] for k in drafters.get(meta["method"]).meta_keys if k in meta})
    out["base_model"] = redact(meta.get("base_model"))
    out["config"] = public_config(meta.get("config") or {})
    data = meta.get("data") or {}
    out["data"] = {k: data[k] for k in _PUBLIC_DATA if k in data} | {"source": redact(data.get("source"))}
    return out


def public_eval(results: dict[str, Any]) -> dict[str, Any]:
    """Eval's numbers, without output texts (which quote the prompts) or local paths."""
    out = {k: results[k] for k in _PUBLIC_EVAL if k in results}
    out["base_model"] = redact(results.get("base_model"))
    compared = results.get("compared") or {}
    if compared:
        out["compared"] = {name: {k: v for k, v in other.items() if k in _PUBLIC_EVAL and k != "base_model"}
                           for name, other in compared.items()}
    return out
