"""Read a medusa-ray training checkpoint: its metadata and the heads' full weights.

A checkpoint is a Ray Train checkpoint directory holding ``medusa_meta.json``, ``heads.safetensors`` (every
head parameter in fp32, gathered from all ranks when the checkpoint was saved; keys are ``MedusaHeads``'
own, which are already the FasterDecoding layout) and ``deepspeed/`` (the sharded engine and optimizer state,
only for resuming the run). Export reads the first two and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from medusa_ray.errors import UserError
from medusa_ray.train.checkpoints import HEADS_FILE, META_FILE, META_FORMAT, is_remote

log = logging.getLogger(__name__)

_META_KEYS = ("base_model", "hidden_size", "vocab_size", "global_step", "zero_stage", "world_size")
_METHOD_KEYS = {"medusa": ("medusa_num_heads", "medusa_num_layers", "share_lm_head"),
                "eagle3": ("eagle3_ttt_steps", "eagle3_layer_ids", "eagle3_draft_vocab_size")}
_HEAD_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


@contextlib.contextmanager
def local_checkpoint(path: str):
    """Yield a local directory for ``path``; a remote URI (s3://, gs://...) is downloaded to a temp dir first."""
    if not is_remote(path):
        yield Path(path)
        return
    import pyarrow.fs

    tmp = Path(tempfile.mkdtemp(prefix="medusa-ckpt-"))
    try:
        log.info("downloading checkpoint %s", path)
        for name in (META_FILE, HEADS_FILE):  # not the DeepSpeed state: export never reads it
            try:
                pyarrow.fs.copy_files(f"{path.rstrip('/')}/{name}", str(tmp / name))
            except FileNotFoundError:
                pass  # read_meta / read_heads say what is missing
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(ckpt: Path) -> dict:
    """``medusa_meta.json`` of a checkpoint, refusing anything that is not a medusa-ray checkpoint."""
    meta_path = ckpt / META_FILE
    if not ckpt.is_dir():
        raise UserError(f"checkpoint {ckpt} does not exist or is not a directory")
    if not meta_path.is_file():
        raise UserError(f"{ckpt} is not a medusa-ray checkpoint: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{meta_path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise UserError(f"{meta_path}: format is {got!r}, expected {META_FORMAT!r}: not a medusa-ray checkpoint")
    method = meta.setdefault("method", "medusa")  # checkpoints from before EAGLE-3 are Medusa heads
    if method not in _METHOD_KEYS:
        raise UserError(f"{meta_path}: unknown drafter method {method!r}")
    missing = [k for k in _META_KEYS + _METHOD_KEYS[method] if k not in meta]
    if missing:
        raise UserError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    return meta


def read_heads(ckpt: Path) -> dict[str, torch.Tensor]:
    """The heads' full fp32 weights, from the safetensors file training gathered at save time.

    Nothing here is unpickled: a checkpoint path can come from shared or object storage that others write to,
    and a pickle runs code when loaded. The DeepSpeed files beside it are never opened.
    """
    from safetensors.torch import load_file

    path = ckpt / HEADS_FILE
    if not path.is_file():
        raise UserError(f"{ckpt}: no {HEADS_FILE} (checkpoints from medusa-ray before 0.4 lack it, and export "
                        "never unpickles DeepSpeed's files); train again to write one")
    try:
        state_dict = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is the user's to fix
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    # Weights in fp32; an EAGLE-3 draft's vocabulary maps stay integers and booleans.
    return {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def check_heads(state_dict: dict[str, torch.Tensor], meta: dict, where: Path) -> None:
    """The checkpoint's tensors are exactly the heads ``meta`` describes: same count, layers and shapes."""
    heads, layers, hidden, vocab = (int(meta[k]) for k in ("medusa_num_heads", "medusa_num_layers", "hidden_size",
                                                          "vocab_size"))
    expected: dict[str, tuple[int, ...]] = {}
    for k in range(heads):
        for j in range(layers):
            expected[f"{k}.{j}.linear.weight"] = (hidden, hidden)
            expected[f"{k}.{j}.linear.bias"] = (hidden,)
        if not meta["share_lm_head"]:
            expected[f"{k}.{layers}.weight"] = (vocab, hidden)
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unexpected or missing:
        found_heads = {int(m.group(1)) for key in state_dict if (m := _HEAD_KEY.match(key))}
        raise UserError(
            f"{where}: weights do not match medusa_meta.json ({heads} heads x {layers} layers): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]} (weights hold {len(found_heads)} heads)"
        )
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise UserError(f"{where}: {key} has shape {tuple(state_dict[key].shape)}, expected {shape}")
