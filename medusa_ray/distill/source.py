"""The prompts as a Ray Data source, and the ledger that decides which conversations this run distills.

``PromptSource`` reads the input's units (``medusa_ray.data.input_units``) with the same streaming parsers the
rest of the project uses, one read task per file, and yields blocks of ``block_rows`` records:
``id, messages (JSON), source (file:line), mode, invalid (the reason, for a bad record)``; Ray Data
merges them into larger blocks, and distill repartitions to ``shard_size`` after the claim. Ray Data's own
readers don't fit: ``read_json`` fails the whole dataset on one malformed line and none of them says which line
a record came from, which is what an error row must name. With ``distill.limit`` one task reads the files in
order, so "the first N records" means the same N on every run.

The ``Ledger`` is one small actor: it knows which ids are done (in data shards, or final errors) from the
output dir, and answers each block's ``claim`` with the records this run should distill, dropping those done
and repeats of a record already claimed (counted, like the source's line totals). It also collects progress
from the workers for the driver's progress bar, so the driver never holds ids or rows.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from medusa_ray.data import (
    Conversation,
    InputUnit,
    InvalidRecord,
    iter_records,
    sample_id,
)
from medusa_ray.errors import UserError

PROMPT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("messages", pa.string()),
    ("source", pa.string()),
    ("mode", pa.string()),
    ("invalid", pa.string()),
])


def _block(records: list[Conversation | InvalidRecord]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in PROMPT_SCHEMA.names}
    for r in records:
        valid = isinstance(r, Conversation)
        columns["id"].append(r.id)
        columns["messages"].append(json.dumps(r.messages, ensure_ascii=False) if valid else None)
        columns["source"].append(r.source)
        columns["mode"].append(r.mode if valid else None)
        columns["invalid"].append(None if valid else r.reason)
    return pa.table(columns, schema=PROMPT_SCHEMA)


def _read(units: list[InputUnit], limit: int | None, block_rows: int) -> Iterator[pa.Table]:
    records: list[Conversation | InvalidRecord] = []
    for record in iter_records(units, limit):
        records.append(record)
        if len(records) >= block_rows:
            yield _block(records)
            records = []
    if records:
        yield _block(records)


class PromptSource(Datasource):
    def __init__(self, units: list[InputUnit], limit: int | None, block_rows: int):
        super().__init__()
        self.units, self.limit, self.block_rows = units, limit, block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def _groups(self) -> list[list[InputUnit]]:
        return [self.units] if self.limit is not None else [[u] for u in self.units]

    @property
    def num_tasks(self) -> int:
        return len(self._groups())

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        groups = self._groups()
        return [
            ReadTask(functools.partial(_read, group, self.limit, self.block_rows),
                     BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                   input_files=tuple(u.path for u in group)),
                     schema=PROMPT_SCHEMA)
            for group in groups
        ]

    def get_name(self) -> str:
        return "Prompts"


CLAIMED_SCHEMA = pa.schema(list(PROMPT_SCHEMA) + [("prompt_id", pa.string()), ("sample", pa.int64())])
"""A claimed row: one reply to generate. ``id`` is the row's (``sample_id(prompt_id, sample)``)."""


def claim(batch: pa.Table, ledger) -> pa.Table:
    """Ray Data map: the rows (record x sample) the ledger assigns to this run, each with its own id."""
    import ray

    ids = batch.column("id").to_pylist()
    samples = ray.get(ledger.claim.remote(ids, [r is None for r in batch.column("invalid").to_pylist()]))
    return expand(batch, samples)


def expand(batch: pa.Table, samples: list[list[int]]) -> pa.Table:
    """Records -> claimed rows: record i once per sample in ``samples[i]``, with the sample's id."""
    take = [i for i, todo in enumerate(samples) for _ in todo]
    rows = batch.take(pa.array(take, pa.int64())) if take else batch.slice(0, 0)
    flat = [k for todo in samples for k in todo]
    prompt_ids = rows.column("id")
    rows = rows.set_column(rows.schema.get_field_index("id"), "id", pa.array([sample_id(p, k) for p, k in zip(prompt_ids.to_pylist(), flat)],
                                             pa.string()))
    return rows.append_column("prompt_id", prompt_ids).append_column("sample", pa.array(flat, pa.int64()))


class Ledger:
    """One per run (a Ray actor): which records to distill, and how far the run has got."""

    def __init__(self, output_dir: str, samples: int = 1):
        from medusa_ray.distill.output import existing_ids, recorded_failures

        self.output_dir = Path(output_dir)
        self.samples = samples
        self.error: UserError | None = None
        try:
            data_ids, final_error_ids = existing_ids(self.output_dir)
            self.done = data_ids | final_error_ids
            self.failed_before = recorded_failures(self.output_dir) - self.done
        except UserError as exc:  # raised by the first call, where the driver sees it as one line
            self.error, self.done, self.failed_before = exc, set(), set()
        self.claimed: set[str] = set()
        self.seen: set[str] = set()
        self.counts = {"records": 0, "skipped": 0, "duplicates": 0, "conversations": 0, "tokens": 0}
        self.first_request: float | None = None
        self.last_reply: float | None = None

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _sample_ids(self, record_id: str, valid: bool) -> list[str]:
        """The row ids a record becomes: one per sample; an invalid record is reported once."""
        return [sample_id(record_id, k) for k in range(self.samples if valid else 1)]

    def any_pending(self, units: list[InputUnit], limit: int | None) -> bool:
        """Whether any row of the input is still to do (stops at the first): no engine starts for nothing."""
        self._check()
        return any(rid not in self.done for record in iter_records(units, limit)
                   for rid in self._sample_ids(record.id, isinstance(record, Conversation)))

    def tally(self, units: list[InputUnit], limit: int | None) -> None:
        """Count an input with nothing left to do (every claim is refused), as a run over it would."""
        batch: list[str] = []
        valid: list[bool] = []
        for record in iter_records(units, limit):
            batch.append(record.id)
            valid.append(isinstance(record, Conversation))
            if len(batch) >= 4096:
                self.claim(batch, valid)
                batch, valid = [], []
        self.claim(batch, valid)

    def claim(self, ids: list[str], valid: list[bool] | None = None) -> list[list[int]]:
        """For each record, the samples this run generates (none for a repeat or a record already done).
        ``skipped`` counts rows (samples) found done; ``records`` and ``duplicates`` count input records."""
        self._check()
        todo = []
        for cid, ok in zip(ids, valid if valid is not None else [True] * len(ids)):
            self.counts["records"] += 1
            if cid in self.seen:
                self.counts["duplicates"] += 1
                todo.append([])
                continue
            self.seen.add(cid)
            mine = []
            for k, rid in enumerate(self._sample_ids(cid, ok)):
                if rid in self.done:
                    self.counts["skipped"] += 1
                else:
                    self.claimed.add(rid)
                    mine.append(k)
            todo.append(mine)
        return todo

    def progress(self, conversations: int, tokens: int, first_request: float | None,
                 last_reply: float | None) -> None:
        self.counts["conversations"] += conversations
        self.counts["tokens"] += tokens
        if first_request is not None:
            self.first_request = min(self.first_request or first_request, first_request)
        if last_reply is not None:
            self.last_reply = max(self.last_reply or last_reply, last_reply)

    def snapshot(self) -> dict[str, Any]:
        generation = (self.last_reply - self.first_request) if self.first_request and self.last_reply else 0.0
        return {**self.counts, "generation_s": generation, "now": time.time(),
                "first_request": self.first_request}

    def finish(self, error_shards: list[str]) -> int:
        """After a complete run: earlier failures it retried to an outcome are no longer listed as failed."""
        from medusa_ray.distill.output import drop_superseded_failures

        return drop_superseded_failures(self.output_dir, self.failed_before & self.claimed, set(error_shards))
