"""Which rows train and which validate, and in what order each rank reads them: decided up front, reproducibly.

The driver reads only the ``id`` (and ``prompt_id``) columns of the distilled Parquet. It drops repeated ids, holds
back a validation share chosen by a seeded hash of the prompt's id (the samples of one prompt,
``distill.samples_per_prompt``, all land on one side), and cuts the training rows into *units*: up to
``UNIT_ROWS`` rows of one Parquet row group (fewer for small data, so every rank gets several). Every epoch the units are shuffled with ``(seed, epoch)``,
dealt round-robin to the ranks, and each unit's rows are shuffled too. A rank's row order is therefore a
pure function of ``(seed, epoch, rank, world)``: a resumed run recomputes it and skips exactly the batches its
checkpoint had consumed, so no row is trained twice or skipped. Ray Data's streaming split cannot promise
that (it hands blocks to whichever worker asks first), which is why the workers read their units themselves.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from medusa_ray import parquet
from medusa_ray.data import prompt_id_of

UNIT_ROWS = 64
COLUMNS = ("id", "messages", "mode")


@dataclass(frozen=True)
class Unit:
    file: str
    row_group: int
    rows: tuple[int, ...]
    """Row indices within the row group."""


@dataclass
class DataPlan:
    train: list[Unit]
    val: list[Unit]
    train_rows: int
    val_rows: int
    duplicates: int = 0
    """Rows dropped because their id repeats an earlier row's."""
    columns: list[str] = field(default_factory=lambda: list(COLUMNS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataPlan":
        units = lambda items: [Unit(u["file"], int(u["row_group"]), tuple(u["rows"])) for u in items]  # noqa: E731
        return cls(units(data["train"]), units(data["val"]), int(data["train_rows"]), int(data["val_rows"]),
                   int(data.get("duplicates", 0)), list(data.get("columns", COLUMNS)))


def validation_size(rows: int, fraction: float, floor: int, cap: int) -> int:
    """``fraction`` of the rows, at least ``floor`` and at most ``cap``, never more than a tenth of them."""
    if fraction <= 0 or rows < 10:
        return 0
    return max(0, min(max(round(rows * fraction), floor), rows // 10, cap))


def _key(seed: int, row_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).digest()


def make_plan(files: list[str], seed: int, val_fraction: float, val_min: int, val_max: int, world: int = 1,
              val_min_tokens: int = 0) -> DataPlan:
    """Read the ids, split validation from training, cut units (see the module docstring): small enough that
    each of ``world`` ranks gets several, so a small shard is not all dealt to one rank.

    Validation takes ``validation_size`` rows, then more, while their replies hold fewer than ``val_min_tokens``
    tokens (the distilled ``completion_tokens``), up to a tenth of the rows: a stop rule needs enough tokens to
    tell progress from noise, and a few long conversations or many short ones may hold them."""

    seen: set[str] = set()
    rows: list[tuple[str, int, int, str]] = []  # (file, row group, index, id), first occurrence of each id
    prompts: dict[str, str] = {}  # row id -> the id of the prompt it answers
    tokens: dict[str, int] = {}  # row id -> its replies' tokens (0 where the data does not say)
    duplicates = 0
    for f in files:
        pf = parquet.open_file(f)
        names = pf.schema_arrow.names
        has_id, has_prompt, has_tokens = "id" in names, "prompt_id" in names, "completion_tokens" in names
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            ids = pf.read_row_group(rg, columns=["id"]).column("id").to_pylist() if has_id else [None] * n
            of = pf.read_row_group(rg, columns=["prompt_id"]).column("prompt_id").to_pylist() if has_prompt \
                else [None] * n
            counts = pf.read_row_group(rg, columns=["completion_tokens"]).column("completion_tokens").to_pylist() \
                if has_tokens and val_min_tokens else [0] * n
            for i, (row_id, prompt, count) in enumerate(zip(ids, of, counts)):
                row_id = str(row_id) if row_id is not None else f"{f}#{rg}:{i}"
                if row_id in seen:
                    duplicates += 1
                    continue
                seen.add(row_id)
                rows.append((f, rg, i, row_id))
                prompts[row_id] = str(prompt) if prompt is not None else prompt_id_of(row_id)
                tokens[row_id] = int(count or 0)
    n_val = validation_size(len(rows), val_fraction, val_min, val_max)
    # Whole prompts in seeded-hash order until they hold n_val rows: with one row per prompt, the n_val rows
    # whose ids hash first, as before there were samples.
    per_prompt = Counter(prompts.values())
    prompt_tokens: Counter = Counter()
    for row_id, prompt in prompts.items():
        prompt_tokens[prompt] += tokens[row_id]
    spare = len(rows) // 10 if n_val else 0  # val_fraction 0 (or tiny data): no validation at all
    if not any(tokens.values()):  # data that does not count its tokens: sized by rows, as before
        val_min_tokens = 0
    val_prompts: set[str] = set()
    taken = taken_tokens = 0
    for prompt in sorted(per_prompt, key=lambda p: _key(seed, p)):
        enough_rows = taken >= n_val
        if enough_rows and (taken_tokens >= val_min_tokens or taken + per_prompt[prompt] > spare):
            break
        val_prompts.add(prompt)
        taken += per_prompt[prompt]
        taken_tokens += prompt_tokens[prompt]
    val_ids = {r[3] for r in rows if prompts[r[3]] in val_prompts}
    train = [r for r in rows if r[3] not in val_ids]
    val = [r for r in rows if r[3] in val_ids]
    size = max(1, min(UNIT_ROWS, len(train) // (4 * world)))
    return DataPlan(_units(train, size), _units(val, UNIT_ROWS), len(train), len(val), duplicates)


def _units(rows: list[tuple[str, int, int, str]], size: int) -> list[Unit]:
    units: list[Unit] = []
    group: list[int] = []
    key = None
    for f, rg, i, _ in rows + [("", -1, -1, "")]:
        if (f, rg) != key or len(group) == size:
            if group:
                units.append(Unit(key[0], key[1], tuple(group)))
            group, key = [], (f, rg)
        group.append(i)
    return units


def epoch_units(plan: DataPlan, seed: int, epoch: int, rank: int, world: int) -> list[tuple[Unit, list[int]]]:
    """This rank's units for ``epoch`` in reading order, each with its rows in reading order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(plan.train))
    mine = []
    for position in order[rank::world]:
        unit = plan.train[int(position)]
        rows = list(unit.rows)
        np.random.default_rng([seed, epoch, int(position)]).shuffle(rows)
        mine.append((unit, rows))
    return mine


class RowReader:
    """Reads rows of the planned files, keeping the last few row groups (units of one group come together)."""

    def __init__(self, columns: list[str], cache: int = 4):
        self.columns = columns
        self.cache_size = cache
        self._cache: dict[tuple[str, int], Any] = {}

    def rows(self, unit: Unit, indices: list[int]) -> list[dict[str, Any]]:

        key = (unit.file, unit.row_group)
        table = self._cache.pop(key, None)
        if table is None:
            pf = parquet.open_file(unit.file)
            cols = [c for c in self.columns if c in pf.schema_arrow.names]
            table = pf.read_row_group(unit.row_group, columns=cols)
        self._cache[key] = table
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        picked = table.take(indices).to_pylist()
        for row, i in zip(picked, indices):
            row.setdefault("id", f"{unit.file}#{unit.row_group}:{i}")
        return picked


def batches(units: list[tuple[Unit, list[int]]], reader: RowReader, batch_size: int, skip: int = 0
            ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows (columns as object arrays) across units, after skipping ``skip`` batches
    without reading the units they cover."""
    skip_rows = skip * batch_size
    pending: list[dict[str, Any]] = []
    for unit, rows in units:
        if skip_rows >= len(rows):
            skip_rows -= len(rows)
            continue
        pending.extend(reader.rows(unit, rows[skip_rows:]))
        skip_rows = 0
        while len(pending) >= batch_size:
            yield to_columns(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield to_columns(pending)


def to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
        column = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            column[i] = row[key]
        out[key] = column
    return out


def validation_rows(plan: DataPlan, reader: RowReader) -> list[dict[str, Any]]:
    """Every validation row, in plan order (each rank then takes its share)."""
    out = []
    for unit in plan.val:
        out.extend(reader.rows(unit, list(unit.rows)))
    return out


def row_ids(plan: DataPlan) -> set[str]:
    """The ids of every planned row, training and validation (reading the ``id`` column only)."""
    out: set[str] = set()
    groups: dict[tuple[str, int], list[int]] = {}
    for unit in plan.train + plan.val:
        groups.setdefault((unit.file, unit.row_group), []).extend(unit.rows)
    for (file, rg), rows in groups.items():
        pf = parquet.open_file(file)
        if "id" in pf.schema_arrow.names:
            ids = pf.read_row_group(rg, columns=["id"]).column("id").to_pylist()
            out.update(str(ids[i]) for i in rows)
        else:
            out.update(f"{file}#{rg}:{i}" for i in rows)
    return out
