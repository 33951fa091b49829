"""The frozen base's features, computed once per row and kept in the run's storage (``train.feature_cache``).

The base never changes during a run, so what a drafter reads of it (Medusa: the last hidden state; EAGLE-3: three
auxiliary layers and the last) is the same for a row in every epoch. The first time a row is trained on, its
features are written to ``<run>/features/``; after that they are read back instead of running the base. Resume
and retries find them there too.

Files: each rank gathers the rows it computed and writes them in batches of about ``FLUSH_BYTES`` to one
safetensors file (``r<rank>-<uuid>.safetensors``), tensor ``"<n>.<name>"`` for the n-th row, whose ids the
header's ``rows`` metadata lists. A file appears whole (written beside and renamed, or uploaded) or not at all.
Any rank reads any file: on object storage a node downloads a file once into its mirror of the run
(``run_files.local_dir``) and reads it there.

``spec.json`` records what the features depend on (base, tokenization, the drafter's layers, dtype); the driver
clears a cache whose spec differs before the workers start (``prepare``).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from medusa_ray.paths import as_uri, is_remote, join

log = logging.getLogger(__name__)

DIR = "features"
SPEC = "spec.json"
FLUSH_BYTES = 256 * 2**20


def spec(cfg, drafter, dtype_name: str) -> dict[str, Any]:
    """What cached features depend on: anything else changing leaves them valid."""
    t = cfg.train
    return {"model": cfg.model, "max_length": t.max_length, "method": drafter.method, "dtype": dtype_name,
            "layers": (drafter.prepared or {}).get("layer_ids"), "format": 1}


def prepare(location: str, wanted: dict[str, Any]) -> int:
    """Driver side, before the workers start: keep the run's cache if it was made for ``wanted``, else clear it and
    write the new spec. Returns how many files it holds (a resumed run's)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(as_uri(join(location, DIR)))
    info = fs.get_file_info(join(root, SPEC))
    if info.type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(join(root, SPEC)) as f:
            found = json.loads(f.read().decode())
        if found == wanted:
            return sum(1 for i in fs.get_file_info(pyarrow.fs.FileSelector(root))
                       if i.base_name.endswith(".safetensors"))
        log.warning("feature cache in %s was made for %s: cleared", join(location, DIR), found)
    if fs.get_file_info(root).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(root)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(join(root, SPEC)) as f:
        f.write(json.dumps(wanted, sort_keys=True).encode())
    return 0


def _files_rows(root_uri: str, skip: set[str] = frozenset()):
    """(file name, its row ids) for every cache file under ``root_uri`` not in ``skip``, from the files' headers
    (their tensors are not read)."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(root_uri)
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)):
        if info.base_name.endswith(".safetensors") and info.base_name not in skip:
            with fs.open_input_file(info.path) as f:
                size = int.from_bytes(f.read_at(8, 0), "little")
                header = json.loads(f.read_at(size, 8))
            yield info.base_name, json.loads(header.get("__metadata__", {}).get("rows", "[]"))


def cached_ids(location: str) -> set[str]:
    """The rows the run's cache holds."""
    return {row_id for _, rows in _files_rows(as_uri(join(location, DIR))) for row_id in rows}


def holds_every_row(location: str, plan) -> bool:
    """Whether the run's cache has every planned row (training and validation): then nothing needs the base."""
    from medusa_ray.train.plan import row_ids

    return row_ids(plan) <= cached_ids(location)


class FeatureStore:
    """One rank's view of the run's feature cache: ``get`` rows any rank wrote, ``put`` the rows it computed."""

    def __init__(self, location: str, rank: int):
        from medusa_ray.train import run_files

        self.rank = rank
        self.root = join(location, DIR)
        self.remote = is_remote(location)
        self.local = (run_files.local_dir(location) / DIR) if self.remote else Path(location) / DIR
        self.local.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, tuple[str, int]] = {}  # row id -> (file name, position in it)
        self.pending: dict[str, dict[str, Any]] = {}
        self.pending_bytes = 0
        self.written_bytes = 0
        self.refresh()

    def refresh(self) -> None:
        """Learn the files every rank has written so far (call when ranks are in step: at an epoch's start)."""
        known = {name for name, _ in self.index.values()}
        for name, rows in _files_rows(as_uri(self.root), known):
            for position, row_id in enumerate(rows):
                self.index[row_id] = (name, position)

    def get(self, row_ids: list[str]) -> list[dict[str, Any]] | None:
        """Every row's features (each ``[len, ...]``), or None when any of them is not cached yet."""
        if any(r not in self.pending and r not in self.index for r in row_ids):
            return None
        from safetensors import safe_open

        out: list[dict[str, Any]] = []
        for row_id in row_ids:
            if row_id in self.pending:
                out.append(self.pending[row_id])
                continue
            name, position = self.index[row_id]
            with safe_open(str(self._local_file(name)), framework="pt") as f:
                prefix = f"{position}."
                out.append({key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)})
        return out

    def _local_file(self, name: str) -> Path:
        path = self.local / name
        if self.remote and not path.is_file():
            import pyarrow.fs

            tmp = self.local / f".{name}.{uuid.uuid4().hex}"
            fs, root = pyarrow.fs.FileSystem.from_uri(self.root)
            with fs.open_input_stream(join(root, name)) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp.rename(path)
        return path

    def put(self, row_id: str, features: dict[str, Any]) -> None:
        """Keep one row's features (``[len, ...]`` each); written with the next full file."""
        if row_id in self.index or row_id in self.pending:
            return
        row = {name: t.detach().to("cpu", copy=True) for name, t in features.items()}  # not a view of the batch
        self.pending[row_id] = row
        self.pending_bytes += sum(t.numel() * t.element_size() for t in row.values())
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as one file (before an epoch ends, so the other ranks see them next epoch)."""
        if not self.pending:
            return
        from safetensors.torch import save_file

        rows = list(self.pending)
        tensors = {f"{n}.{name}": t for n, row_id in enumerate(rows) for name, t in self.pending[row_id].items()}
        name = f"r{self.rank:05d}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.local / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"rows": json.dumps(rows)})
        if self.remote:
            import pyarrow.fs

            pyarrow.fs.copy_files(str(tmp), join(self.root, name))
        tmp.rename(self.local / name)  # the local copy (the mirror, or the cache itself): whole or absent
        for position, row_id in enumerate(rows):
            self.index[row_id] = (name, position)
        self.written_bytes += self.pending_bytes
        self.pending.clear()
        self.pending_bytes = 0


class FeatureSource:
    """The features of a collated batch: from the cache when every row is there, else from the base (and cached).

    With a sharded base every rank must run every forward (ZeRO-3 gathers each layer from all ranks), so the ranks
    agree first: if any of them misses a row, all of them run the base for this batch."""

    def __init__(self, drafter, decoder, store: FeatureStore | None, collectives=None, sharded: bool = False):
        self.drafter, self.decoder, self.store = drafter, decoder, store
        self.collectives, self.sharded = collectives, sharded
        self.hits = self.misses = 0

    def __call__(self, row_ids: list[str], batch, device) -> dict[str, Any]:
        ids, mask, _ = batch
        if self.store is None:
            return self.drafter.features(self.decoder, ids.to(device), mask.to(device))
        if self.decoder is None:  # the base was not loaded: the driver found every row cached
            cached = self.store.get(row_ids) if row_ids else []
            if cached is None:
                raise RuntimeError(f"feature cache in {self.store.root}: rows {row_ids} are missing, and the base "
                                   "was not loaded because the cache held every row when the run started")
            if not row_ids:  # a batch of no rows (all skipped): zeros of the cached features' widths
                return self.empty(ids.shape, device)
            self.hits += len(row_ids)
            return _padded(cached, ids.shape[1], device)
        lengths = mask.sum(dim=1).tolist()
        cached = self.store.get(row_ids) if row_ids else None  # a batch of no rows (all skipped) runs the base
        hit = cached is not None and all(next(iter(c.values())).shape[0] == n for c, n in zip(cached, lengths))
        if self.sharded:
            hit = self.collectives.all_true(hit)
        if hit:
            self.hits += len(row_ids)
            return _padded(cached, ids.shape[1], device)
        features = self.drafter.features(self.decoder, ids.to(device), mask.to(device))
        self.misses += len(row_ids)
        for i, (row_id, n) in enumerate(zip(row_ids, lengths)):
            self.store.put(row_id, {name: t[i, :n] for name, t in features.items()})
        return features

    def empty(self, shape, device) -> dict[str, Any]:
        """Zero features for a ``[B, T]`` batch that holds no rows, shaped like any cached row's."""
        import torch

        some = self.store.get([next(iter(self.store.index))])[0]
        return {name: torch.zeros(*shape, *t.shape[1:], dtype=t.dtype, device=device) for name, t in some.items()}


def _padded(rows: list[dict[str, Any]], length: int, device) -> dict[str, Any]:
    """Rows' ``[len, ...]`` features right-padded with zeros to ``[B, length, ...]`` (padding is never read)."""
    import torch

    out = {}
    for name in rows[0]:
        first = rows[0][name]
        batch = torch.zeros(len(rows), length, *first.shape[1:], dtype=first.dtype)
        for i, row in enumerate(rows):
            batch[i, :row[name].shape[0]] = row[name]
        out[name] = batch.to(device)
    return out
