"""Where the training checkpoints of a run are, and what is in them (contract 2).

A checkpoint is a Ray Train checkpoint directory ``<storage_path>/<run_name>/checkpoint_step<N>`` with
``medusa_meta.json`` (what was trained and how) and ``deepspeed/`` (``engine.save_checkpoint`` output of
every rank, tag ``global_step<N>``). ``storage_path`` is a local or shared path or an object-storage URI
(``s3://``, ``gs://``); a checkpoint is named by a local path or a URI of the same scheme.

Which checkpoints a run has comes from Ray Train itself (``ray.train.Result.from_path``): it lists only the
checkpoints it registered, so a directory left half-uploaded by a killed run is never picked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

META_FILE = "medusa_meta.json"
META_FORMAT = "medusa-ray/1"
DEEPSPEED_DIR = "deepspeed"
HEADS_FILE = "heads.safetensors"
"""The heads' full fp32 weights, gathered from every rank at save time: export reads only this file, so it
never unpickles anything (DeepSpeed's own files are pickles, read back only to resume the run that wrote them)."""
WORKERS_DIR = "workers"  # rank-<r>.json: the node and device each rank trained on


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike."""
    return "/".join([str(base).rstrip("/"), *parts])


@dataclass
class CheckpointInfo:
    uri: str
    """A local path, or a URI of the run's storage scheme."""
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["global_step"])


def read_meta(checkpoint: str) -> dict[str, Any]:
    """``medusa_meta.json`` of a checkpoint at a local path or URI."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(_as_uri(checkpoint))
    with fs.open_input_stream(f"{path}/{META_FILE}") as f:
        meta = json.loads(f.read())
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{checkpoint}/{META_FILE}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def worker_nodes(checkpoint: str) -> list[str]:
    """Ray node ids of the ranks that wrote ``checkpoint`` (rank order)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(_as_uri(checkpoint))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{WORKERS_DIR}", allow_not_found=True))
    nodes = []
    for info in sorted(infos, key=lambda i: i.base_name):
        with fs.open_input_stream(info.path) as f:
            nodes.append(json.loads(f.read()).get("node_id"))
    return nodes


def _as_uri(path: str) -> str:
    from pathlib import Path

    return path if is_remote(path) else Path(path).expanduser().resolve().as_uri()


def run_checkpoints(storage_path: str, run_name: str) -> list[CheckpointInfo]:
    """The checkpoints Ray Train registered for run ``run_name``, oldest step first ([] for no run)."""
    import pyarrow.fs
    from ray.train import Result

    from medusa_ray import logs

    logs.adopt_library_loggers()  # Ray Train set its driver-side logger up on import

    run = join(storage_path, run_name)
    fs, fs_path = pyarrow.fs.FileSystem.from_uri(_as_uri(run))
    if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
        return []
    try:
        result = Result.from_path(run if is_remote(run) else fs_path)
    except RuntimeError:
        return []  # no checkpoint registered yet (a run killed while uploading its first one)
    scheme = run.split("://", 1)[0] + "://" if is_remote(run) else ""
    found = []
    for checkpoint, _ in result.best_checkpoints:
        uri = scheme + checkpoint.path if scheme and not is_remote(checkpoint.path) else checkpoint.path
        try:
            found.append(CheckpointInfo(uri, read_meta(uri)))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found, key=lambda c: c.step)


def validation_score(checkpoint: CheckpointInfo) -> float | None:
    validation = checkpoint.meta.get("validation") or {}
    return validation.get("expected_acceptance")


def best_checkpoint(found: list[CheckpointInfo]) -> CheckpointInfo | None:
    """The checkpoint with the best validation expected acceptance (the later one on a tie); the latest when
    none was validated."""
    scored = [c for c in found if validation_score(c) is not None]
    if not scored:
        return found[-1] if found else None
    return max(scored, key=lambda c: (validation_score(c), c.step))


def find_latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The registered checkpoint with the highest global step of run ``run_name``, or None."""
    found = run_checkpoints(storage_path, run_name)
    return found[-1].uri if found else None
