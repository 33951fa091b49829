"""One writer per output location: an exclusive lock file beside it, naming who holds it.

Two runs on one directory (a ``ray job submit`` stopped with Ctrl-C keeps running on the cluster) would
delete each other's in-flight shards, write every conversation twice or swap an export out from under a
push. ``hold(path, what)`` creates ``.<name>.lock`` next to ``path`` with ``O_CREAT | O_EXCL``, which is
atomic on local disks and on NFS, and writes the holder's host, pid, Ray job and start time into it.

A lock whose holder ran on this host and no longer exists is stale and taken over with a warning. A lock
from another host cannot be checked from here: the error names the holder and the file to delete once
you know that run is gone. Object storage has no exclusive create, so ``s3://``-style locations are not
locked (say so in the docs, not silently).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from medusa_ray.errors import UserError

log = logging.getLogger(__name__)


def lock_path(location: str | Path) -> Path:
    path = Path(location).expanduser().resolve()
    return path.parent / f".{path.name}.lock"


def _ray_job() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - the lock is still useful without a job id
        pass
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    job = f", Ray job {holder['ray_job']}" if holder.get("ray_job") else ""
    return f"{holder.get('what', 'a run')} (pid {holder.get('pid')} on {holder.get('host')}{job}, since {started})"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold(location: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock of ``location`` for the ``with`` block; raise a one-line UserError if another run has it."""
    if "://" in str(location):
        yield Path(str(location))
        return
    path = lock_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "ray_job": _ray_job(),
          "started": time.time()}
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            same_host = holder.get("host") == me["host"]
            if same_host and holder.get("pid") == me["pid"]:
                yield path  # this process holds it already (the pipeline around a stage): nothing to take
                return
            if attempt == 0 and same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.warning("taking over the stale lock of %s: %s is gone", location, _describe(holder))
                path.unlink(missing_ok=True)
                continue
            where = "" if same_host else f"; if that run is gone, delete {path}"
            raise UserError(f"{location} is in use by {_describe(holder)}{where}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        holder = _read(path)
        if (holder.get("pid"), holder.get("host")) == (me["pid"], me["host"]):
            path.unlink(missing_ok=True)
