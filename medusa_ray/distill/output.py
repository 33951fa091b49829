"""Sharded Parquet output: data rows in ``output_dir/*.parquet``, failures in ``output_dir/errors/*.parquet``.

``ShardSink`` is the Ray Data ``Datasink`` that ends distill's pipeline: each block of finished conversations
(one outcome row per conversation) becomes one data shard and one errors shard. Every shard is written to a
hidden temporary name and renamed into place, so a reader (or a resumed run) only ever sees complete shards,
and is named after the ids it holds, so a retried write task replaces its own shard instead of adding a
second copy. The ids in existing shards, data and errors alike, are what a re-run skips.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from medusa_ray import parquet
from medusa_ray.errors import UserError

log = logging.getLogger(__name__)

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string()), ("token_ids", pa.list_(pa.int32()))])
"""One message of a row: ``token_ids`` is an assistant reply's generated ids exactly as the engine returned
them (special tokens and its own token split kept; the end-of-sequence token included when it stopped there),
null where the engine gave none and on every other turn. Rows written before it have role and content only."""

DATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        # The input conversation this row answers: ``id`` itself, or ``id`` less its ``#s<k>`` sample suffix.
        ("prompt_id", pa.string()),
        ("messages", pa.list_(MESSAGE_TYPE)),
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
                    ids.update(parquet.read_table(file, columns=["id"]).column("id").to_pylist())
                else:
                    rows = parquet.read_table(file, columns=["id", "reason"]).to_pylist()
                    ids.update(r["id"] for r in rows if r["reason"] in FINAL_ERRORS)
            except Exception as exc:
                raise UserError(f"{file}: unreadable shard in the output dir ({exc}); move it away to continue") from None
        found.append(ids)
    return found[0], found[1]


def existing_models(output_dir: Path) -> set[str]:
    models: set[str] = set()
    for file in _shard_files(output_dir) if output_dir.is_dir() else []:
        models.update(parquet.read_table(file, columns=["model"]).column("model").unique().to_pylist())
    return models


OUTCOME_SCHEMA = pa.schema(
    list(DATA_SCHEMA)
    + [
        ("outcome", pa.string()),  # "row" (a training row) or an error reason
        ("source", pa.string()),
        ("error", pa.string()),
        ("round", pa.int64()),
        ("attempts", pa.int64()),
        ("generated_tokens", pa.int64()),  # every token generated for it, failed attempts included
    ]
)
"""What distill's pipeline carries to the sink: one row per finished conversation, training row or error."""

ROW = "row"
OUTCOMES = ("failed", "empty", "invalid")
COUNTS = ("rows", "truncated", "without_token_ids", *OUTCOMES, "tokens", "shards")


def _write_atomic(table: pa.Table, directory: Path, name: str, before_rename=None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{_TMP_PREFIX}{name}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, directory / name)
    return directory / name


def _shard_name(prefix: str, ids: list[str]) -> str:
    # Named after its content: the same conversations always land in the same file, so a retried write
    # overwrites its first attempt, and a re-run's new outcome for the same failures replaces the old one.
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


class ShardSink(Datasink):
    """Outcome rows -> a data shard and an errors shard per block; each write returns its counts, and the
    driver's instance adds them up (``totals``) when the write completes."""

    def __init__(self, output_dir: str, model: str, kill_pids: list[int] | None = None):
        self.output_dir = output_dir
        self.model = model
        self.kill_pids = kill_pids
        self.totals: dict[str, Any] = {**dict.fromkeys(COUNTS, 0), "error_shards": []}

    def write(self, blocks: Iterable[Any], ctx) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        counts: dict[str, Any] = {**dict.fromkeys(COUNTS, 0), "error_shards": []}
        if not tables:
            return counts
        table = pa.concat_tables(tables).cast(OUTCOME_SCHEMA)
        out = Path(self.output_dir)
        outcome = table.column("outcome").to_pylist()
        rows = table.filter(pa.array([o == ROW for o in outcome])).select(DATA_SCHEMA.names)
        errors = table.filter(pa.array([o != ROW for o in outcome]))
        errors = pa.table({"id": errors["id"], "source": errors["source"], "reason": errors["outcome"],
                           "error": errors["error"], "round": errors["round"], "attempts": errors["attempts"],
                           "model": pa.array([self.model] * errors.num_rows, pa.string())}, schema=ERROR_SCHEMA)
        kill = self._kill if self.kill_pids else None
        if rows.num_rows:
            _write_atomic(rows, out, _shard_name("shard", rows.column("id").to_pylist()), kill)
            counts["shards"] = 1
        if errors.num_rows:
            name = _shard_name("errors", errors.column("id").to_pylist())
            _write_atomic(errors, out / ERRORS_DIR, name, kill)
            counts["error_shards"] = [name]
        counts["rows"] = rows.num_rows
        counts["truncated"] = sum(r == "length" for r in rows.column("finish_reason").to_pylist())
        counts["without_token_ids"] = sum(
            any(m["role"] == "assistant" and m["token_ids"] is None for m in messages)
            for messages in rows.column("messages").to_pylist())
        for reason in OUTCOMES:
            counts[reason] = outcome.count(reason)
        counts["tokens"] = sum(table.column("generated_tokens").to_pylist())
        return counts

    def _kill(self) -> None:
        """Fault ``distill_kill_at=shard_write``: die between writing a shard and renaming it into place."""
        for pid in [*self.kill_pids, os.getpid()]:
            os.kill(pid, signal.SIGKILL)

    def on_write_complete(self, write_result) -> None:
        for counts in write_result.write_returns:
            for key, value in counts.items():
                self.totals[key] += value

    def get_name(self) -> str:
        return "Shards"


def recorded_failures(output_dir: Path) -> set[str]:
    """Ids with a ``failed`` error row: what a re-run retries."""
    ids: set[str] = set()
    directory = output_dir / ERRORS_DIR
    for file in _shard_files(directory) if directory.is_dir() else []:
        rows = parquet.read_table(file, columns=["id", "reason"]).to_pylist()
        ids.update(r["id"] for r in rows if r["reason"] == "failed")
    return ids


def drop_superseded_failures(output_dir: Path, ids: set[str], keep_files: set[str]) -> int:
    """Remove the ``failed`` rows of ``ids`` (earlier failures this run retried to an outcome) from every errors
    shard but ``keep_files`` (this run's own), so every conversation is recorded once across data and errors.
    Returns the rows removed."""
    removed = 0
    directory = output_dir / ERRORS_DIR
    for file in _shard_files(directory) if directory.is_dir() else []:
        if file.name in keep_files:
            continue
        table = parquet.read_table(file)
        stale = [r == "failed" and i in ids for r, i in zip(table.column("reason").to_pylist(),
                                                            table.column("id").to_pylist())]
        if not any(stale):
            continue
        kept = table.filter(pa.array([not s for s in stale]))
        removed += table.num_rows - kept.num_rows
        if kept.num_rows:
            _write_atomic(kept, directory, file.name)
        else:
            file.unlink()
    return removed
