"""The run's own files (tracker logs, ``metrics.jsonl``, plots) live beside its checkpoints in the run's storage.

Trackers can only write to a local directory. With local or shared storage that directory *is*
``<storage_path>/<run_name>``; with object storage it is a mirror on the writing node, filled from the run's
storage before rank 0 starts and copied back after every checkpoint and at the end, so nothing is lost with
the node rank 0 ran on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from medusa_ray.paths import is_remote, join, private_dir

log = logging.getLogger(__name__)

# Everything medusa-ray writes into a run directory (Ray Train's own files and checkpoints excluded).
RUN_FILES = ("tracking.json", "metrics.jsonl", "validation.jsonl", "head_losses.png", "validation.png",
             "tensorboard", "wandb", "mlruns")
FAIL_MARKER_PREFIX = ".fail_at_step_"


def run_location(storage_path: str, run_name: str) -> str:
    """``<storage_path>/<run_name>``: a local path or a URI."""
    return join(storage_path, run_name)


def local_dir(location: str) -> Path:
    """Where this node writes the run's files: the run directory itself, or a mirror of a remote one."""
    if not is_remote(location):
        return Path(location)
    # In this user's own directory: a shared temp dir is where another user could plant a run's files.
    mirrors = private_dir(Path(tempfile.gettempdir()) / f"medusa-ray-runs-{os.getuid()}")
    key = hashlib.sha256(location.encode()).hexdigest()[:12]
    return mirrors / key / location.rstrip("/").rsplit("/", 1)[-1]


def pull(location: str) -> Path:
    """The local directory for ``location``, holding the run's files as its storage has them."""
    local = local_dir(location)
    local.mkdir(parents=True, exist_ok=True)
    if not is_remote(location):
        return local
    import shutil

    import pyarrow.fs

    # The mirror holds exactly what the storage holds: anything left from an earlier run of the same name on
    # this node (whose storage was since deleted) would otherwise be appended to and uploaded again.
    for name in RUN_FILES:
        stale = local / name
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    fs, root = pyarrow.fs.FileSystem.from_uri(location)
    for top in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if not (top.base_name in RUN_FILES or top.base_name.startswith(FAIL_MARKER_PREFIX)):
            continue
        files = [top] if top.type == pyarrow.fs.FileType.File else [
            i for i in fs.get_file_info(pyarrow.fs.FileSelector(top.path, recursive=True))
            if i.type == pyarrow.fs.FileType.File]
        for info in files:
            dest = local / info.path[len(root):].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    return local


def push(location: str) -> None:
    """Copy the run's files from this node's mirror to the run's storage (no-op for local storage)."""
    if not is_remote(location):
        return
    import pyarrow.fs

    local = local_dir(location)
    for path in sorted(local.iterdir()) if local.is_dir() else []:
        if path.name in RUN_FILES or path.name.startswith(FAIL_MARKER_PREFIX):
            try:
                pyarrow.fs.copy_files(str(path), join(location, path.name))
            except OSError as exc:  # the next push tries again; training goes on
                log.warning("could not copy %s to %s: %s", path, location, exc)
