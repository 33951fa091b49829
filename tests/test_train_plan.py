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


def test_a_prompts_samples_stay_on_one_side_of_the_validation_split(tmp_path):
    """distill.samples_per_prompt: rows ``<id>``, ``<id>#s1``, ... answer one prompt; validation takes whole
    prompts, by a seeded hash of the prompt's id (its ``prompt_id`` column, or the id less its sample suffix)."""
    from medusa_ray.data import prompt_id_of, sample_id

    prompts = [f"p{i}" for i in range(100)]
    ids = [sample_id(p, k) for p in prompts for k in range(3)]
    assert ids[:4] == ["p0", "p0#s1", "p0#s2", "p1"] and [prompt_id_of(i) for i in ids[:4]] == ["p0"] * 3 + ["p1"]
    assert prompt_id_of("a#s0") == "a#s0" and prompt_id_of("#s1") == "#s1" and prompt_id_of("x#sy") == "x#sy"
    messages = [[{"role": "user", "content": i}] for i in ids]
    with_column = tmp_path / "with" / "part.parquet"
    derived = tmp_path / "derived" / "part.parquet"
    for path, table in ((with_column, pa.table({"id": ids, "prompt_id": [prompt_id_of(i) for i in ids],
                                                "messages": messages})),
                        (derived, pa.table({"id": ids, "messages": messages}))):
        path.parent.mkdir()
        pq.write_table(table, path, row_group_size=50)
    splits = []
    for path in (with_column, derived):
        plan = make_plan([str(path)], seed=0, val_fraction=0.1, val_min=20, val_max=500)
        reader = RowReader(plan.columns)
        val = [r["id"] for u in plan.val for r in reader.rows(u, list(u.rows))]
        train = [r for e in _epoch(plan, 0, 0, 0, 1, batch_size=1000) for r in e]
        assert 30 <= len(val) <= 32 and len(val) % 3 == 0 and len(val) + len(train) == 300
        assert not {prompt_id_of(i) for i in val} & {prompt_id_of(i) for i in train}
        splits.append(sorted(val))
    assert splits[0] == splits[1]
    # One row per prompt: the split is the one ids alone always gave.
    single = tmp_path / "single.parquet"
    pq.write_table(pa.table({"id": prompts, "messages": messages[:100]}), single)
    plan = make_plan([str(single)], seed=0, val_fraction=0.1, val_min=5, val_max=500)
    reader = RowReader(plan.columns)
    import hashlib

    first = sorted(prompts, key=lambda p: hashlib.sha256(f"0:{p}".encode()).digest())[:10]
    assert sorted(r["id"] for u in plan.val for r in reader.rows(u, list(u.rows))) == sorted(first)


def _token_files(tmp_path, tokens_per_row: int, n: int = 1000):
    ids = [f"r{i}" for i in range(n)]
    table = pa.table({"id": ids, "messages": [[{"role": "user", "content": i}] for i in ids], "mode": ["chat"] * n,
                      "completion_tokens": [tokens_per_row] * n})
    path = tmp_path / f"tokens-{tokens_per_row}.parquet"
    pq.write_table(table, path)
    return [str(path)]


def test_validation_takes_enough_reply_tokens_up_to_a_tenth_of_the_data(tmp_path):
    # 20 rows of 500 tokens already hold 10k tokens: the row floor (2% of 1000, at least 20) decides.
    plan = make_plan(_token_files(tmp_path, 500), 0, 0.02, 20, 500, val_min_tokens=10_000)
    assert plan.val_rows == 20
    # Rows of 200 tokens: 50 rows make 10k tokens, more than the 20 the row floor asks for.
    plan = make_plan(_token_files(tmp_path, 200), 0, 0.02, 20, 500, val_min_tokens=10_000)
    assert plan.val_rows == 50 and plan.train_rows == 950
    # Short rows: never more than a tenth of the data, whatever the token floor.
    assert make_plan(_token_files(tmp_path, 10), 0, 0.02, 20, 500, val_min_tokens=10_000).val_rows == 100
    # Data without token counts, and val_fraction 0 (no validation), are as before.
    assert make_plan(_files(tmp_path), 0, 0.05, 20, 500, val_min_tokens=10_000).val_rows == 20
    assert make_plan(_token_files(tmp_path, 10), 0, 0.0, 20, 500, val_min_tokens=10_000).val_rows == 0


def test_the_stop_rule_follows_a_smoothed_curve_and_needs_a_real_improvement():
    from medusa_ray.train.worker import Progress, Schedule, record_validation

    schedule = Schedule(total_steps=1000, warmup_steps=0, val_every=10, checkpoint_every=10, early_stopping=True,
                        min_steps=0, patience=3, min_improvement=0.01, smoothing=0.5)
    p = Progress()
    # A real rise, then noise that creeps upward by less than 1%: patience runs out.
    curve = [1.2, 1.5, 1.6, 1.61, 1.605, 1.612, 1.608, 1.61, 1.606, 1.611, 1.609, 1.612, 1.607, 1.61]
    smoothed = []
    for i, ea in enumerate(curve):
        p.step = (i + 1) * 10
        record_validation(p, schedule, ea)
        smoothed.append(p.smoothed)
        if p.stopped_early:
            break
    assert p.stopped_early and p.step < len(curve) * 10
    assert "did not improve by 1.0% in 3 validations" in p.stop_reason
    # The best checkpoint is the best of the smoothed curve.
    assert p.best_val == max(smoothed) and p.best_step == (smoothed.index(max(smoothed)) + 1) * 10

    # One lucky validation does not make a checkpoint the best when the average disagrees.
    p = Progress()
    for i, ea in enumerate([1.5, 1.9, 1.5, 1.5]):
        p.step = (i + 1) * 10
        record_validation(p, Schedule(**{**schedule.__dict__, "smoothing": 0.0}), ea)
    raw_best = p.best_step
    p = Progress()
    for i, ea in enumerate([1.5, 1.9, 1.5, 1.5]):
        p.step = (i + 1) * 10
        record_validation(p, schedule, ea)
    assert raw_best == 20 and p.best_val == 1.7 and p.best_step == 20
