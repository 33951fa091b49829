"""Write an export directory: the drafter's own files (``Drafter.export_files``), the marker and the card, built
in a temp dir beside the target and swapped in whole, so the target is never half-written.
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

from medusa_ray.errors import UserError
from medusa_ray.export.card import write_model_card
from medusa_ray.export.files import MARKER_FILE
from medusa_ray.paths import check_local_model, looks_local

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        if looks_local(name):
            name = str(Path(name).expanduser().resolve())
        return name, cfg.get_text_config()
    raise UserError("cannot load the base model's config: " + "; ".join(errors))


def check_base(meta: dict, base_name: str, base_cfg: Any) -> None:
    """Refuse a drafter whose hidden size or vocabulary do not fit the base model."""
    for key in ("hidden_size", "vocab_size"):
        theirs = getattr(base_cfg, key, None)
        if theirs is not None and int(theirs) != int(meta[key]):
            raise UserError(f"the checkpoint's drafter has {key}={meta[key]} but base model {base_name} has "
                            f"{key}={theirs}")


def base_dtype(base_cfg: Any) -> torch.dtype:
    """The base model's weight dtype: the export matches what the servers run the base in."""
    dtype = getattr(base_cfg, "dtype", None) or getattr(base_cfg, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES.get(str(dtype).removeprefix("torch."), torch.float32)


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


def write_export(out: Path, marker: dict, write_files) -> None:
    """``write_files(tmp)`` writes the drafter's files into a temp dir beside ``out``; the marker and the card
    join them, and the whole dir is swapped in, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_files(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        write_model_card(tmp)
        _publishable(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
