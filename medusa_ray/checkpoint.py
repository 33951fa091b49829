"""A training checkpoint: the one format train writes, train reads back to resume, and export reads.

A checkpoint is a Ray Train checkpoint directory ``<storage_path>/<run_name>/checkpoint_step<N>`` holding:

- ``draft_meta.json``: a ``Meta`` (what was trained, on which base, how far, how well);
- ``draft.safetensors``: the drafter's trained tensors in full fp32, gathered from every rank at save time;
  export reads only this file and the meta, so it never unpickles anything;
- ``deepspeed/``: every rank's ``engine.save_checkpoint`` output (tag ``global_step<N>``), read only to resume;
- ``workers/rank-<r>.json``: the node and device each rank trained on.

medusa-ray 0.1 named the first two ``medusa_meta.json`` and ``heads.safetensors``; they are still read.
``storage_path`` is a local or shared path or an object-storage URI; which checkpoints a run has comes from Ray
Train itself (``ray.train.Result.from_path``), so a directory left half-uploaded by a killed run is never picked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medusa_ray import __version__, logs
from medusa_ray.errors import UserError
from medusa_ray.paths import as_uri, is_remote, join

log = logging.getLogger(__name__)

FORMAT = "medusa-ray/1"
META_FILE = "draft_meta.json"
WEIGHTS_FILE = "draft.safetensors"
_LEGACY = {META_FILE: "medusa_meta.json", WEIGHTS_FILE: "heads.safetensors"}  # medusa-ray 0.1's names
DEEPSPEED_DIR = "deepspeed"
WORKERS_DIR = "workers"


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


@dataclass
class Meta:
    """What a checkpoint holds. Written flat as JSON (the drafter's ``shape`` keys beside the others)."""

    method: str
    """The drafter (``train.method``)."""
    global_step: int
    base_model: str = ""
    hidden_size: int = 0
    vocab_size: int = 0
    zero_stage: int = 0
    world_size: int = 1
    shape: dict[str, Any] = field(default_factory=dict)
    """The drafter's own keys (its ``meta_keys``: heads and layers, draft steps and vocabulary...)."""
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    base_architectures: list[str] = field(default_factory=list)
    version: str = __version__
    """The medusa-ray that wrote it."""

    _REQUIRED = ("base_model", "hidden_size", "vocab_size", "global_step", "zero_stage", "world_size")

    def flat(self) -> dict[str, Any]:
        """Every key at the top level, as drafters and the export's public metadata read them."""
        out = dataclasses.asdict(self)
        shape = out.pop("shape")
        return {"format": FORMAT, **out, **shape}

    def to_json(self) -> str:
        return json.dumps(self.flat(), indent=2)

    @classmethod
    def from_flat(cls, raw: Any, where: str, strict: bool = True) -> "Meta":
        """Parse a meta file's content; ``strict`` refuses one missing what export needs (one line naming the
        file, the keys and the medusa-ray that wrote it)."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise UserError(f"{where}: format is {got!r}, expected {FORMAT!r}: not a medusa-ray checkpoint "
                            f"(this is medusa-ray {__version__})")
        version = str(raw.get("version") or "0.1.0")  # 0.1 wrote no version
        missing = [k for k in ("global_step",) + (cls._REQUIRED if strict else ()) if k not in raw]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)} (written by medusa-ray {version}; "
                            f"this is {__version__})")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and k not in ("shape", "version")}
        values.setdefault("method", "medusa")  # 0.1 checkpoints from before EAGLE-3 are Medusa heads
        shape = {k: v for k, v in raw.items() if k not in known and k != "format"}
        return cls(**values, shape=shape, version=version)

    def require(self, keys: tuple[str, ...], where: str) -> None:
        """The drafter's own keys must be there (export builds the drafter from them)."""
        missing = [k for k in keys if k not in self.shape]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)} for a {self.method} drafter (written by "
                            f"medusa-ray {self.version}; this is {__version__})")


def _open(location: str, name: str):
    """The file ``name`` (or its 0.1 name) of a checkpoint at a local path or URI, opened for reading."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(as_uri(location))
    for candidate in (name, _LEGACY.get(name)):
        if candidate and fs.get_file_info(f"{path}/{candidate}").type == pyarrow.fs.FileType.File:
            return fs.open_input_stream(f"{path}/{candidate}"), candidate
    raise FileNotFoundError(join(location, name))


def read_meta(location: str | Path, strict: bool = True) -> Meta:
    """The ``Meta`` of a checkpoint at a local path or URI (one line if it is not a medusa-ray checkpoint)."""
    location = str(location)
    if not is_remote(location) and not Path(location).is_dir():
        raise UserError(f"checkpoint {location} does not exist or is not a directory")
    try:
        stream, name = _open(location, META_FILE)
    except FileNotFoundError:
        raise UserError(f"{location} is not a medusa-ray checkpoint: it has no {META_FILE}") from None
    with stream:
        text = stream.read()
    where = join(location, name)
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: not valid JSON ({exc})") from None
    return Meta.from_flat(raw, where, strict)


def write(directory: Path, meta: Meta, weights: dict | None) -> None:
    """Rank 0's part of a checkpoint: the meta and (when given) the gathered weights."""
    from safetensors.torch import save_file

    if weights is not None:
        save_file(weights, str(directory / WEIGHTS_FILE))
    (directory / META_FILE).write_text(meta.to_json())


def read_weights(directory: Path) -> dict:
    """The drafter's full weights, from the safetensors file training gathered at save time: fp32 weights, integer
    and boolean maps as they are. Nothing here is unpickled (the DeepSpeed files beside it are never opened)."""
    import torch
    from safetensors.torch import load_file

    path = next((directory / n for n in (WEIGHTS_FILE, _LEGACY[WEIGHTS_FILE]) if (directory / n).is_file()), None)
    if path is None:
        raise UserError(f"{directory}: no {WEIGHTS_FILE} (early medusa-ray 0.1.0 builds did not write it, and export "
                        "never unpickles DeepSpeed's files); train again to write one")
    try:
        state_dict = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is the user's to fix
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    return {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[Path]:
    """A local directory holding the checkpoint's meta and weights: the checkpoint itself, or (for a URI) those
    two files downloaded to a temp dir; the DeepSpeed state is never downloaded."""
    if not is_remote(location):
        yield Path(location)
        return
    import pyarrow.fs

    tmp = Path(tempfile.mkdtemp(prefix="medusa-ckpt-"))
    try:
        log.info("downloading checkpoint %s", location)
        for name in (META_FILE, WEIGHTS_FILE):
            for candidate in (name, _LEGACY[name]):
                try:
                    pyarrow.fs.copy_files(join(location, candidate), str(tmp / candidate))
                    break
                except FileNotFoundError:
                    continue  # read_meta / read_weights say what is missing
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def worker_nodes(location: str) -> list[str]:
    """Ray node ids of the ranks that wrote the checkpoint (rank order)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(as_uri(location))
    infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{WORKERS_DIR}", allow_not_found=True))
    nodes = []
    for info in sorted(infos, key=lambda i: i.base_name):
        with fs.open_input_stream(info.path) as f:
            nodes.append(json.loads(f.read()).get("node_id"))
    return nodes


@dataclass
class Found:
    """A checkpoint Ray Train registered for a run."""

    uri: str
    """A local path, or a URI of the run's storage scheme."""
    meta: Meta

    @property
    def step(self) -> int:
        return int(self.meta.global_step)

    @property
    def score(self) -> float | None:
        """Its validation expected acceptance (None: not validated)."""
        validation = self.meta.validation or {}
        # The moving average the stop rule follows; checkpoints from before it carry only the raw value.
        return validation.get("smoothed_expected_acceptance", validation.get("expected_acceptance"))


def run_checkpoints(storage_path: str, run_name: str) -> list[Found]:
    """The checkpoints Ray Train registered for run ``run_name``, oldest step first ([] for no run)."""
    import pyarrow.fs
    from ray.train import Result


    logs.adopt_library_loggers()  # Ray Train set its driver-side logger up on import
    run = join(storage_path, run_name)
    fs, fs_path = pyarrow.fs.FileSystem.from_uri(as_uri(run))
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
            found.append(Found(uri, read_meta(uri, strict=False)))
        except (OSError, UserError):
            continue
    return sorted(found, key=lambda c: c.step)


def best_checkpoint(found: list[Found]) -> Found | None:
    """The checkpoint with the best validation expected acceptance (the later one on a tie); the latest when
    none was validated."""
    scored = [c for c in found if c.score is not None]
    if not scored:
        return found[-1] if found else None
    return max(scored, key=lambda c: (c.score, c.step))


def find_latest_checkpoint(storage_path: str, run_name: str) -> str | None:
    """The registered checkpoint with the highest global step of run ``run_name``, or None."""
    found = run_checkpoints(storage_path, run_name)
    return found[-1].uri if found else None
