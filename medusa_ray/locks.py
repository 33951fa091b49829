"""One writer per output location: an exclusive lock file beside it, naming who holds it.

Two runs on one directory (a ``ray job submit`` stopped with Ctrl-C keeps running on the cluster) would
delete each other's in-flight shards, write every conversation twice or swap an export out from under a
push. ``hold(path, what)`` creates ``.<name>.lock`` next to ``path`` with ``O_CREAT | O_EXCL``, which is
atomic on local disks and on NFS, and writes the holder's host, pid, Ray job and start time into it.

A lock whose holder ran on this host and no longer exists is stale and taken over with a warning. A lock
from another host cannot be checked from here: the error names the holder and the file to delete once
you know that run is gone.

Taking over is a race: two starters can both read the same stale holder, and if each simply deleted the
lock and created its own, the slower one would delete the faster one's fresh lock and both would hold.
So every lock file carries a random nonce, and only the starter that creates ``<lock>.stale-<nonce>``
(``O_EXCL``: one winner per stale lock) may remove it, after re-reading the lock and finding the same
nonce. Nobody else removes a lock with that nonce, and a new lock can only appear once it is removed, so
what the winner removes is the stale lock; everyone then competes for the lock with ``O_EXCL`` again.
(Renaming the stale lock aside and putting it back if it turned out fresh would briefly move a live lock
out of the way, long enough for a third starter to create one too.) Object storage has no exclusive create, so ``s3://``-style locations are not
locked (say so in the docs, not silently).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
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


def _nonce(holder: dict) -> str:
    """What identifies one lock file's holder; a lock written before nonces existed is named by its content."""
    if isinstance(holder.get("nonce"), str) and holder["nonce"]:
        return holder["nonce"]
    return hashlib.sha256(json.dumps(holder, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _remove_stale(path: Path, stale: dict) -> None:
    """Remove the lock at ``path`` if it is still the stale one read as ``stale``; no-op if it is not (another
    starter took it over first, and its lock stays)."""
    nonce = _nonce(stale)
    marker = path.with_name(f"{path.name}.stale-{nonce}")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return  # another starter is removing this very stale lock
    try:
        if path.exists() and _nonce(_read(path)) == nonce:
            path.unlink(missing_ok=True)
    finally:
        marker.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(location: str | Path, what: str) -> Iterator[Path]:
    """Hold the lock of ``location`` for the ``with`` block; raise a one-line UserError if another run has it."""
    if "://" in str(location):
        yield Path(str(location))
        return
    path = lock_path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"what": what, "host": socket.gethostname(), "pid": os.getpid(), "ray_job": _ray_job(),
          "started": time.time(), "nonce": uuid.uuid4().hex}
    for attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            same_host = holder.get("host") == me["host"]
            if same_host and holder.get("pid") == me["pid"]:
                yield path  # this process holds it already (the pipeline around a stage): nothing to take
                return
            if attempt < 2 and same_host and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                log.warning("taking over the stale lock of %s: %s is gone", location, _describe(holder))
                _remove_stale(path, holder)
                continue
            where = "" if same_host else f"; if that run is gone, delete {path}"
            raise UserError(f"{location} is in use by {_describe(holder)}{where}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield path
    finally:
        if _read(path).get("nonce") == me["nonce"]:
            path.unlink(missing_ok=True)
