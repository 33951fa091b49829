"""Fail before the work, not after it: an output location must be writable and have room.

An hour of generation or training that ends in ``PermissionError`` or ``No space left on device`` loses the
hour; ``check_writable`` costs a file create and a ``statvfs``, so every stage calls it first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from medusa_ray.errors import UserError

MIN_FREE_MB = 100
"""Less free space than this in an output location is refused up front."""


def check_writable(directory: str | Path, key: str) -> None:
    """``directory`` (created if missing) accepts a new file and has ``MIN_FREE_MB`` free; else one line naming
    the config ``key``. Object-storage URIs are left to the storage client."""
    if "://" in str(directory):
        return
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medusa-ray-write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{key}={directory}: cannot write there ({exc.strerror or exc})") from None
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < MIN_FREE_MB:
        raise UserError(f"{key}={directory}: only {free_mb:.0f} MiB free (at least {MIN_FREE_MB} MiB needed)")
