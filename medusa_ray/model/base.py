"""The frozen base model's own weights that drafters reuse, read from its safetensors files without loading it.

A drafter for a 70B base must not need the base in memory to be exported or evaluated: the output projection
(``lm_head``, or the input embedding of a tied model) is read as one tensor from the one shard that holds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medusa_ray.errors import UserError


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
