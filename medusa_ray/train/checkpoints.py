"""Where the training checkpoints of a run are, and what is in them (contract 2).

A checkpoint is a Ray Train checkpoint directory ``<storage_path>/<run_name>/checkpoint_step<N>`` with
``medusa_meta.json`` (what was trained and how) and ``deepspeed/`` (``engine.save_checkpoint`` output of
every rank, tag ``global_step<N>``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "medusa_meta.json"
META_FORMAT = "medusa-ray/1"
DEEPSPEED_DIR = "deepspeed"
# Ray Train's record of the checkpoints it registered; a directory it does not list may be half-uploaded.
_RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / META_FILE
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def find_latest_checkpoint(storage_path: str, run_name: str) -> Path | None:
    """The complete checkpoint with the highest global step of run ``run_name``, or None.

    Local (or NFS-mounted) storage only; for ``s3://`` storage download the checkpoint first.
    """
    run_dir = Path(storage_path).expanduser() / run_name
    if not run_dir.is_dir():
        return None
    snapshot = run_dir / _RAY_SNAPSHOT
    if not snapshot.is_file():
        # Ray Train resumes only from checkpoints it registered; a run killed while uploading its first
        # checkpoint has a directory but nothing to resume from.
        return None
    registered = snapshot.read_text()
    best: tuple[int, Path] | None = None
    for d in run_dir.glob("checkpoint_*"):
        if not (d / META_FILE).is_file() or not (d / DEEPSPEED_DIR / "latest").is_file():
            continue
        if d.name not in registered:
            continue
        try:
            step = int(read_meta(d)["global_step"])
        except (ValueError, KeyError, OSError):
            continue
        if best is None or step > best[0]:
            best = (step, d)
    return best[1] if best else None
