"""Write the export directory: ``medusa_lm_head.safetensors``, ``config.json``, tokenizer, model card.

The directory is one artifact for both servers:

* TGI (``text_generation_server``) treats a model dir as Medusa when ``config.json`` has
  ``medusa_num_heads``; it loads the base from ``base_model_name_or_path``, reads ``medusa_num_layers``,
  and takes ``{k}.{j}.linear.weight|bias`` and ``{k}.{L}.weight`` from ``medusa_lm_head.safetensors``.
  Its ``SpeculativeHead.load`` only builds Medusa heads when ``config.json`` has **no** ``architectures`` key
  (any architecture other than ``MLPSpeculatorPreTrainedModel`` silently disables speculation), so we
  never write one.
* vLLM reads ``model_type: "medusa"`` into its ``MedusaConfig`` (which sets ``architectures`` to
  ``["MedusaModel"]`` itself), maps ``medusa_num_heads``/``medusa_num_layers``, needs ``hidden_size``,
  ``vocab_size`` and ``medusa_fc_bias: true`` (without it the block biases are dropped silently), and
  remaps the same FasterDecoding keys from every ``*.safetensors`` file in the directory.

``share_lm_head`` heads were trained projecting through the frozen base ``lm_head``. Both servers' common
layout is one vocab projection per head, so export writes a copy of the base ``lm_head`` as each head's
``{k}.{L}.weight``: numerically the same heads, loadable by TGI's ``MedusaHeadV1`` and by vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from medusa_ray.paths import check_local_model
from medusa_ray.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "medusa_lm_head.safetensors"
MARKER_FILE = "medusa_ray_export.json"
EVAL_FILE = "eval_results.json"
COMPARISON_FILE = "drafters.json"
"""Written by ``pipeline`` when it trained several drafters: each one's numbers on the same prompts."""
EXPORT_FORMAT = "medusa-ray-export/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_local_path(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~"))


def resolve_base(candidates: list[str]) -> tuple[str, Any]:
    """First base model of ``candidates`` whose config loads: (name, text config)."""
    from transformers import AutoConfig

    errors = []
    for name in dict.fromkeys(c for c in candidates if c):
        try:
            check_local_model(name)
            cfg = AutoConfig.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - any failure means "try the next candidate"
            errors.append(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        if is_local_path(name):
            name = str(Path(name).expanduser().resolve())
        return name, cfg.get_text_config()
    raise UserError("cannot load the base model's config: " + "; ".join(errors))


def check_base(meta: dict, base_name: str, base_cfg: Any) -> None:
    """Refuse heads whose hidden size or vocabulary do not fit the base model."""
    for key in ("hidden_size", "vocab_size"):
        theirs = getattr(base_cfg, key, None)
        if theirs is not None and int(theirs) != int(meta[key]):
            raise UserError(f"checkpoint heads have {key}={meta[key]} but base model {base_name} has {key}={theirs}")


def base_dtype(base_cfg: Any) -> torch.dtype:
    """The base model's weight dtype: the export matches what the servers run the base in."""
    dtype = getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES.get(str(dtype).removeprefix("torch."), torch.float32)


def output_weight_names(base_name: str) -> list[str]:
    """Names the base model's output projection may have in its weight files (a tied model's is its input
    embedding), found on a skeleton built on the meta device: no weights are read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    weight = model.get_output_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    # Some checkpoints were saved from the bare base model, without its prefix.
    return list(dict.fromkeys(names + [n.removeprefix(prefix) for n in names if n.startswith(prefix)]))


def _weight_file(base_name: str, filename: str) -> Path | None:
    """A file of the base model: from its directory, or downloaded alone from the Hub; None if it has none."""
    local = Path(base_name).expanduser()
    if local.is_dir():
        return local / filename if (local / filename).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(base_name, filename))
    except EntryNotFoundError:
        return None


def base_lm_head(base_name: str) -> torch.Tensor:
    """The base model's output projection ``[vocab, hidden]`` in fp32, read as one tensor from the safetensors
    shard that holds it (for a Hub model: the index and that one shard are downloaded), never by loading the
    model: an 8B model would not fit the memory export runs in."""
    from safetensors import safe_open

    names = output_weight_names(base_name)
    index = _weight_file(base_name, "model.safetensors.index.json")
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        name = next((n for n in names if n in weight_map), None)
        shard = _weight_file(base_name, weight_map[name]) if name else None
    else:
        shard = _weight_file(base_name, "model.safetensors")
        name = None
        if shard is not None:
            with safe_open(str(shard), framework="pt") as f:
                name = next((n for n in names if n in f.keys()), None)
    if shard is None or name is None:
        raise UserError(f"base model {base_name}: no safetensors weight named {' or '.join(names)}; export reads "
                        "the output projection from safetensors files only")
    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(name).float()


def head_tensors(state_dict: dict[str, torch.Tensor], meta: dict, base_name: str, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """FasterDecoding/TGI tensors; ``share_lm_head`` heads get a copy of the base lm_head each."""
    tensors = dict(state_dict)
    if meta["share_lm_head"]:
        lm_head = base_lm_head(base_name)
        for k in range(int(meta["medusa_num_heads"])):
            tensors[f"{k}.{int(meta['medusa_num_layers'])}.weight"] = lm_head
    # safetensors refuses shared storage; each tensor gets its own contiguous copy.
    return {k: v.to(dtype).contiguous().clone() for k, v in sorted(tensors.items())}


def medusa_config(meta: dict, base_name: str) -> dict[str, Any]:
    """``config.json`` both servers read. Deliberately no ``architectures`` (see module docstring) and
    no other key with "num" in its name (vLLM renames any such key to ``num_heads``/``num_hidden_layers``)."""
    return {
        "model_type": "medusa",
        "medusa_num_heads": int(meta["medusa_num_heads"]),
        "medusa_num_layers": int(meta["medusa_num_layers"]),
        "hidden_size": int(meta["hidden_size"]),
        "vocab_size": int(meta["vocab_size"]),
        "medusa_fc_bias": True,
        "base_model_name_or_path": base_name,
        "version": "2",
    }


def read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT else None


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap a fully written ``tmp`` in for ``out``: the old export is only removed once the new one is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
        os.rename(out, old / out.name)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _publishable(tmp: Path) -> None:
    """mkdtemp makes 0700 dirs (and safetensors 0600 files); an export is meant to be read by servers."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_medusa_files(tmp: Path, tensors: dict[str, torch.Tensor], config: dict, base_name: str) -> None:
    """Medusa's files: the heads, the ``config.json`` both servers read, the base tokenizer (TGI loads it here)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        AutoTokenizer.from_pretrained(base_name).save_pretrained(tmp)
    except Exception as exc:  # noqa: BLE001 - a base without a tokenizer still gives usable heads
        log.warning("base model %s: tokenizer not copied (%s)", base_name, exc)


def write_export(out: Path, marker: dict, write_files) -> None:
    """``write_files(tmp)`` writes the drafter's files into a temp dir beside ``out``; the marker and the card
    join them, and the whole dir is swapped in, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_files(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        from medusa_ray.export.card import write_model_card

        write_model_card(tmp)
        _publishable(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
