"""Sharded Parquet output: data rows in ``output_dir/*.parquet``, failures in ``output_dir/errors/*.parquet``.

Every shard is written to a hidden temporary name and renamed into place, so a reader (or a resumed run)
only ever sees complete shards. The ids in existing shards, data and errors alike, are what a re-run skips.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medusa_ray.errors import UserError

log = logging.getLogger(__name__)

DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("mode", pa.string()),
        ("model", pa.string()),
        (
            "sampling",
            pa.struct(
                [("temperature", pa.float64()), ("top_p", pa.float64()), ("max_tokens", pa.int64()),
                 ("seed", pa.int64())]
            ),
        ),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        # invalid (bad input record) | failed (request error) | empty (the model said nothing)
        ("reason", pa.string()),
        ("error", pa.string()),
        ("round", pa.int64()),
        ("attempts", pa.int64()),
        ("model", pa.string()),
    ]
)

ERRORS_DIR = "errors"
_TMP_PREFIX = ".tmp-"


def _shard_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith("."))


def remove_stale_temp_files(output_dir: Path) -> None:
    """Temp files are what a killed run was writing; their conversations were never counted as done."""
    for directory in (output_dir, output_dir / ERRORS_DIR):
        for tmp in directory.glob(_TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)


FINAL_ERRORS = ("empty", "invalid")
"""Error outcomes a re-run would only repeat (the model's own empty answer, an input we cannot read). Failed
requests (a replica restarting after a preemption, a 5xx, a timeout) are not among them: a re-run retries."""


def existing_ids(output_dir: Path) -> tuple[set[str], set[str]]:
    """(ids in data shards, ids whose error is final); raises UserError naming an unreadable shard."""
    found = []
    for directory in (output_dir, output_dir / ERRORS_DIR):
        ids: set[str] = set()
        for file in _shard_files(directory) if directory.is_dir() else []:
            try:
                if directory == output_dir:
                    ids.update(pq.read_table(file, columns=["id"]).column("id").to_pylist())
                else:
                    rows = pq.read_table(file, columns=["id", "reason"]).to_pylist()
                    ids.update(r["id"] for r in rows if r["reason"] in FINAL_ERRORS)
            except Exception as exc:
                raise UserError(f"{file}: unreadable shard in the output dir ({exc}); move it away to continue") from None
        found.append(ids)
    return found[0], found[1]


def existing_models(output_dir: Path) -> set[str]:
    models: set[str] = set()
    for file in _shard_files(output_dir) if output_dir.is_dir() else []:
        models.update(pq.read_table(file, columns=["model"]).column("model").unique().to_pylist())
    return models


def _write_atomic(table: pa.Table, directory: Path, prefix: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    # Time first so shards list in write order; the uuid keeps concurrent runs from colliding.
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = directory / f"{_TMP_PREFIX}{name}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    return directory / name


class ShardWriter:
    """Buffers finished rows and writes a shard every ``shard_size`` rows (and whatever is left on flush)."""

    def __init__(self, output_dir: Path, shard_size: int):
        self.output_dir = output_dir
        self.shard_size = shard_size
        self._rows: list[dict] = []
        self._errors: list[dict] = []
        self.shards_written = 0
        self.rows_written = 0

    def add_row(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.shard_size:
            self._flush_rows()

    def add_error(self, error: dict) -> None:
        self._errors.append(error)
        if len(self._errors) >= self.shard_size:
            self._flush_errors()

    def flush(self) -> None:
        self._flush_rows()
        self._flush_errors()

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        path = _write_atomic(pa.Table.from_pylist(self._rows, schema=DATA_SCHEMA), self.output_dir, "shard")
        self.shards_written += 1
        self.rows_written += len(self._rows)
        log.info("wrote %s (%d conversations, %d in total)", path.name, len(self._rows), self.rows_written)
        self._rows = []

    def _flush_errors(self) -> None:
        if not self._errors:
            return
        _write_atomic(pa.Table.from_pylist(self._errors, schema=ERROR_SCHEMA), self.output_dir / ERRORS_DIR, "errors")
        self._errors = []
