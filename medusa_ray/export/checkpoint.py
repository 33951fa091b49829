"""Read a medusa-ray training checkpoint and consolidate its DeepSpeed shards into one state_dict.

A checkpoint (contract 2) is a Ray Train checkpoint directory holding ``medusa_meta.json`` and
``deepspeed/`` as written by ``engine.save_checkpoint(<ckpt>/deepspeed, tag="global_step{N}")`` on every
rank, with the ``MedusaHeads`` module itself wrapped by DeepSpeed, so consolidated keys are already the
FasterDecoding layout.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from medusa_ray.errors import UserError
from medusa_ray.train.checkpoints import DEEPSPEED_DIR, META_FILE, META_FORMAT, is_remote

log = logging.getLogger(__name__)

_META_KEYS = ("base_model", "medusa_num_heads", "medusa_num_layers", "share_lm_head", "hidden_size", "vocab_size",
              "global_step", "zero_stage", "world_size")
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
        pyarrow.fs.copy_files(path, str(tmp))
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
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{meta_path}: missing key(s) {', '.join(missing)}")
    return meta


def _deepspeed_tag(ds_dir: Path, meta: dict) -> str:
    tag = f"global_step{meta['global_step']}"
    if (ds_dir / tag).is_dir():
        return tag
    latest = ds_dir / "latest"
    if latest.is_file() and (ds_dir / latest.read_text().strip()).is_dir():
        return latest.read_text().strip()
    tags = sorted(p.name for p in ds_dir.iterdir() if p.is_dir()) if ds_dir.is_dir() else []
    if len(tags) == 1:
        return tags[0]
    raise UserError(f"{ds_dir}: no DeepSpeed checkpoint tag {tag!r} (found: {', '.join(tags) or 'nothing'})")


def consolidate(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Full fp32 head weights from the DeepSpeed shards of any ZeRO stage and world size."""
    ds_dir = ckpt / DEEPSPEED_DIR
    tag = _deepspeed_tag(ds_dir, meta)
    shard_dir = ds_dir / tag
    stage = int(meta["zero_stage"])
    try:
        if stage == 0:
            # Stage 0 keeps the whole module in rank 0's model states; there are no partitions to merge.
            states = torch.load(shard_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
            state_dict = {k: v.float() for k, v in states["module"].items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # zero_to_fp32 narrates every shard on stdout; keep the CLI output to our own table.
            with contextlib.redirect_stdout(io.StringIO()):
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UserError(f"{shard_dir}: cannot consolidate DeepSpeed ZeRO-{stage} checkpoint: {exc}") from None
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}


def check_heads(state_dict: dict[str, torch.Tensor], meta: dict, where: Path) -> None:
    """The consolidated tensors are exactly the heads ``meta`` describes: same count, layers and shapes."""
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
