"""The data plan: the validation split, and a per-epoch row order that is a pure function of
(seed, epoch, rank, world), so a resumed run reads exactly what the interrupted one had left."""

import pyarrow as pa
import pyarrow.parquet as pq

from medusa_ray.train.plan import RowReader, batches, epoch_units, make_plan, validation_size


def _files(tmp_path, n=300, shards=3, duplicate=None):
    files = []
    per = n // shards
    for s in range(shards):
        ids = [f"r{i}" for i in range(s * per, (s + 1) * per)]
        if duplicate is not None and s == shards - 1:
            ids[0] = duplicate
        table = pa.table({"id": ids, "messages": [[{"role": "user", "content": i}] for i in ids],
                          "mode": ["chat"] * per})
        path = tmp_path / f"part-{s}.parquet"
        pq.write_table(table, path, row_group_size=40)
        files.append(str(path))
    return files


def _epoch(plan, seed, epoch, rank, world, skip=0, batch_size=8):
    reader = RowReader(plan.columns)
    return [list(b["id"]) for b in batches(epoch_units(plan, seed, epoch, rank, world), reader, batch_size, skip)]


def test_validation_split_is_stable_bounded_and_disjoint(tmp_path):
    files = _files(tmp_path, duplicate="r0")
    plan = make_plan(files, seed=0, val_fraction=0.05, val_min=20, val_max=500)
    assert plan.duplicates == 1
    assert (plan.train_rows, plan.val_rows) == (279, 20)  # 299 unique rows; 5% = 15, raised to the floor of 20
    val = {i for u in plan.val for i in RowReader(plan.columns).rows(u, list(u.rows)) for i in [i["id"]]}
    train = {r for e in _epoch(plan, 0, 0, 0, 1, batch_size=1000) for r in e}
    assert len(val) == 20 and not val & train and len(train) == 279
    assert make_plan(files, 0, 0.05, 20, 500).val == plan.val  # same seed, same split
    assert make_plan(files, 1, 0.05, 20, 500).val != plan.val
    assert validation_size(100_000, 0.05, 20, 500) == 500 and validation_size(9, 0.5, 1, 5) == 0


def test_every_epoch_reshuffles_and_ranks_share_the_rows(tmp_path):
    plan = make_plan(_files(tmp_path), seed=3, val_fraction=0.0, val_min=1, val_max=1)
    ranks = [[r for b in _epoch(plan, 3, 0, rank, 2) for r in b] for rank in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) + len(ranks[1]) == 300
    again = [[r for b in _epoch(plan, 3, 0, rank, 2) for r in b] for rank in range(2)]
    assert again == ranks  # deterministic
    next_epoch = [r for b in _epoch(plan, 3, 1, 0, 2) for r in b]
    assert next_epoch != ranks[0]  # reshuffled


def test_skipping_batches_continues_exactly_where_an_epoch_stopped(tmp_path):
    plan = make_plan(_files(tmp_path), seed=0, val_fraction=0.0, val_min=1, val_max=1)
    full = _epoch(plan, 0, 2, 1, 2)
    for skip in (0, 1, 5, len(full) - 1, len(full)):
        assert _epoch(plan, 0, 2, 1, 2, skip=skip) == full[skip:]


def test_a_single_small_row_group_still_feeds_every_rank(tmp_path):
    table = pa.table({"id": [f"r{i}" for i in range(44)], "messages": [[{"role": "user", "content": "x"}]] * 44,
                      "mode": ["chat"] * 44})
    pq.write_table(table, tmp_path / "one.parquet")
    plan = make_plan([str(tmp_path / "one.parquet")], seed=0, val_fraction=0.0, val_min=1, val_max=1, world=2)
    sizes = [sum(len(b) for b in _epoch(plan, 0, 0, rank, 2)) for rank in range(2)]
    assert sum(sizes) == 44 and min(sizes) >= 15  # units of 5 rows: 5 units to one rank, 4 to the other
