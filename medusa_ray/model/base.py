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


def weight_files(base_name: str) -> list[Path]:
    """The base model's safetensors files, in the order its index lists them (one file when it has no index)."""
    index = _weight_file(base_name, "model.safetensors.index.json")
    if index is not None:
        names = dict.fromkeys(json.loads(index.read_text()).get("weight_map", {}).values())
        files = [_weight_file(base_name, name) for name in names]
    else:
        files = [_weight_file(base_name, "model.safetensors")]
    if not files or any(f is None for f in files):
        raise UserError(f"base model {base_name}: no safetensors weights (model.safetensors or its index); the "
                        "sharded base reads safetensors files only (or set train.shard_base=false)")
    return files


def output_weight(base, base_name: str) -> torch.Tensor:
    """The base's output projection ``[vocab, hidden]``: the parameter itself when this process holds it whole,
    read from the safetensors files when ZeRO-3 partitions it across the workers (``sharded_base``) or the model is
    a skeleton on the meta device (training from a complete feature cache)."""
    weight = base.get_output_embeddings().weight
    elsewhere = hasattr(weight, "ds_id") or weight.is_meta  # partitioned, or a skeleton without weights
    return base_lm_head(base_name).to(weight.dtype) if elsewhere else weight


def sharded_base(base_name: str, dtype: torch.dtype, ds_config: dict):
    """The frozen base, partitioned across every rank of the process group by a ZeRO-3 engine of its own (no
    optimizer), and loaded so that no process ever holds all of it.

    The model is built under ``deepspeed.zero.Init``, so each parameter is partitioned as it is created (and never
    initialised: every one is loaded next). Then, one tensor at a time, rank 0 reads it from its safetensors file
    and ``GatheredParameters`` hands each rank its share. A process's peak is its share of the base plus the
    largest tensor (twice, on rank 0: the file's pages and the copy), whatever the base's size. Each file is
    opened per tensor, so its pages are unmapped as soon as the tensor is copied.

    A forward gathers each layer's parameters just before the layer runs and frees them after: every rank must
    run every forward (the training loop already steps ranks together). Returns the DeepSpeed engine; its
    ``module`` is the model."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    _return_freed_memory()
    config = AutoConfig.from_pretrained(base_name)
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    loaded: set[str] = set()
    rank = dist.get_rank()
    for path in weight_files(base_name):
        with safe_open(str(path), framework="pt") as f:  # the header only: every rank checks every shape
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        for name, shape in shapes.items():
            target = name if name in params else f"{prefix}{name}"
            param = params.get(target)
            if param is None or target in loaded:
                continue  # a tied duplicate, or a tensor this architecture does not use (e.g. rotary caches)
            if shape != tuple(param.ds_shape):
                raise UserError(f"base model {base_name}: {name} in {path.name} has shape {shape}, the model "
                                f"expects {tuple(param.ds_shape)}")
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    with safe_open(str(path), framework="pt") as f:
                        param.data.copy_(f.get_tensor(name))
            loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise UserError(f"base model {base_name}: no weight for {missing[:3]} in its safetensors files; the sharded "
                        "base loads plain checkpoints by name (set train.shard_base=false for this one)")
    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    return engine


def _return_freed_memory(threshold: int = 2**20) -> None:
    """Make glibc give blocks over ``threshold`` bytes back to the OS when they are freed.

    A sharded base gathers each layer whole, uses it and frees it, thousands of times. glibc serves such blocks
    from its heap and keeps them once freed (its mmap threshold grows to 32 MiB with use), so a process's
    resident memory climbed back to nearly the whole base (measured: 2.9 GiB peak for a 1.2 GiB share of a
    2.45 GiB base; 1.95 GiB with this). Other allocators, or other C libraries, are left as they are."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; a fixed value also stops glibc from raising it
    except (OSError, AttributeError):
        pass
