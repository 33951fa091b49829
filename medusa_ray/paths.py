"""What a location string names: a local path, a remote URI (object storage), or a Hugging Face Hub id.

Every stage asks here, so "is this local?" has one answer everywhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from medusa_ray.errors import UserError


def is_remote(location: str | os.PathLike) -> bool:
    """An object-storage URI (``s3://``, ``gs://``...): read and written through ``pyarrow.fs``."""
    return "://" in str(location)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike."""
    return "/".join([str(base).rstrip("/"), *parts])


def as_uri(location: str) -> str:
    """A URI ``pyarrow.fs.FileSystem.from_uri`` takes: remote ones as they are, local paths as ``file://``."""
    return location if is_remote(location) else Path(location).expanduser().resolve().as_uri()


def looks_local(model: str) -> bool:
    """Whether a model name means a directory on this machine rather than a Hub id: it exists, starts with ``.``,
    ``/`` or ``~``, has more than two path parts, or is ``a/b`` where ``a`` is a local directory. ``org/name``
    and bare names are Hub ids."""
    if Path(model).expanduser().exists():
        return True
    parts = Path(model).parts
    return model.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def is_hub_id(model: str) -> bool:
    return not is_remote(model) and not looks_local(model)


def check_local_model(model: str) -> None:
    """A model that names a local directory must exist: one line instead of letting the Hub client try
    ``outputs/tiny-model`` as a repo id."""
    if looks_local(model) and not Path(model).expanduser().exists():
        raise UserError(f"model={model}: no such directory (a local path; Hub ids look like org/name)")


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can write: created 0700, or refused in one line when it exists and
    belongs to someone else or others may write it (a shared temp dir is where another user plants files)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: not a directory of ours (a link or a file); remove it")
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise UserError(f"{path}: owned by uid {info.st_uid} or writable by others; refusing to use it "
                        "(remove it, or point TMPDIR elsewhere)")
    return path
