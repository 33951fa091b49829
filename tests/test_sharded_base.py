"""The sharded base (``train.shard_base``) and the feature cache (``train.feature_cache``): two ranks over gloo, no
Ray. The base is partitioned by its own ZeRO-3 engine and loaded file by file, or its features are read back from
the run's storage; either way the drafter must be the one a replicated base, run on every step, trains."""

import json
import multiprocessing as mp
import os

import pytest
import torch
from helpers import free_port

from medusa_ray.config import build_config
from medusa_ray.tiny import corpus

WORLD = 2
pytestmark = pytest.mark.slow  # two processes that each import DeepSpeed: tens of seconds


@pytest.fixture(scope="module")
def sharded_files_model(tmp_path_factory):
    """A random tiny model saved in several safetensors files (with an index), as large models come."""
    from medusa_ray.tiny import make_tiny_model

    out = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sharded", pretrain_steps=0,
                          max_shard_size="200KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("data") / "part-0.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": f"c{i}", "messages": m, "mode": "chat"}
                                         for i, m in enumerate(corpus.conversations(24, seed=3))]), path)
    return path


def _train(rank: int, port: int, overrides: list[str], data: str, out: str, run: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import torch.distributed as dist

    from medusa_ray.train import features, plan_schedule
    from medusa_ray.train.plan import make_plan
    from medusa_ray.train.worker import LocalSession, prepare_drafter, run_loop

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        cfg = build_config({}, overrides)
        plan = make_plan([data], 0, cfg.train.val_fraction, 2, 100, world=WORLD)
        session = LocalSession(torch.device("cpu"), f"{out}/checkpoints")
        prepared = prepare_drafter(cfg.to_dict(), plan.to_dict())
        complete = cfg.train.feature_cache is True and features.holds_every_row(run, plan)  # as the driver decides
        result = run_loop(cfg, session, plan, plan_schedule(cfg.train, plan.train_rows), run,
                          prepared=prepared, features_complete=complete)
        with open(f"{out}/result-{rank}.json", "w") as f:
            json.dump({"step": result["progress"]["step"], "loss": result["metrics"]["loss"],
                       "base_sharded": result["base_sharded"], "base_loaded": result["base_loaded"],
                       "features": result["features"]}, f)
        if rank == 0:
            from medusa_ray import checkpoint

            torch.save(checkpoint.read_weights(session.checkpoints[-1]), f"{out}/weights.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, name: str, overrides: list[str], data, run: str | None = None) -> tuple[dict, dict]:
    """Train on two ranks; the final weights and rank 0's result. ``run``: the run's directory (its storage)."""
    out = tmp_path / name
    out.mkdir()
    run = run or str(out / "run")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_train, args=(r, port, overrides, str(data), str(out), run)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    results = [json.loads((out / f"result-{r}.json").read_text()) for r in range(WORLD)]
    total = {k: sum(r["features"][k] for r in results) for k in ("computed_rows", "cached_rows")}
    return torch.load(out / "weights.pt"), {**results[0], "features": total}


@pytest.mark.parametrize("method", ["medusa", "eagle3"])
def test_a_sharded_base_trains_the_drafter_a_replicated_one_does(sharded_files_model, rows, tmp_path, method):
    common = [f"model={sharded_files_model}", f"train.method={method}", "train.zero_stage=2", "train.batch_size=2",
              "train.max_steps=3", "train.warmup_steps=0", "train.max_length=96", "train.tracking=[]",
              "train.val_fraction=0", "train.lr=3e-3", "train.eagle3_draft_vocab_size=256"]
    replicated, r_result = _run(tmp_path, "replicated", common + ["train.shard_base=false"], rows)
    sharded, s_result = _run(tmp_path, "sharded", common + ["train.shard_base=true"], rows)
    assert r_result["step"] == s_result["step"] == 3
    assert (r_result["base_sharded"], s_result["base_sharded"]) == (False, True)
    assert set(sharded) == set(replicated)
    for name in replicated:
        torch.testing.assert_close(sharded[name], replicated[name], rtol=1e-4, atol=1e-5, msg=name)
    assert s_result["loss"] == pytest.approx(r_result["loss"], rel=1e-4)


def test_the_feature_cache_runs_the_base_once_per_row_and_trains_the_same_drafter(sharded_files_model, rows,
                                                                                     tmp_path):
    from medusa_ray.train import features

    common = [f"model={sharded_files_model}", "train.zero_stage=2", "train.batch_size=2", "train.epochs=3",
              "train.warmup_steps=0", "train.max_length=96", "train.tracking=[]", "train.val_fraction=0.2",
              "train.val_every=2", "train.lr=3e-3"]
    plain, p_result = _run(tmp_path, "plain", common + ["train.feature_cache=false"], rows)
    run = str(tmp_path / "cached-run")
    features.prepare(run, {"test": 1})  # what the driver does before the workers start
    cached, c_result = _run(tmp_path, "cached", common + ["train.feature_cache=true", "train.shard_base=true"], rows,
                            run=run)
    assert p_result["step"] == c_result["step"] and c_result["base_sharded"]
    assert p_result["features"]["cached_rows"] == 0
    # 22 training rows, 2 validation rows: each ran the base once (a batch that misses on one rank runs on both,
    # the sharded base needs every rank in a forward: at most a batch per rank more), and later passes read them.
    # Without the cache the base would have run on 3 x 22 training rows and on every validation.
    computed, hits = c_result["features"]["computed_rows"], c_result["features"]["cached_rows"]
    assert 24 <= computed <= 24 + 2 * WORLD and hits >= 40
    assert len(features.FeatureStore(run, 0).index) == 24  # every row is in the run's cache, once
    assert len(list((tmp_path / "cached-run" / features.DIR).glob("*.safetensors"))) >= 2
    for name in plain:  # batches pad differently once rows come from the cache: equal up to float noise
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-3, atol=1e-4, msg=name)

    # A retry of the run (or a resume) finds every row in the run's storage: the base is not even loaded, and the
    # drafter trained from the cache alone is the same.
    again_weights, again = _run(tmp_path, "again", common + ["train.feature_cache=true"], rows, run=run)
    assert again["features"]["computed_rows"] == 0 and again["features"]["cached_rows"] > 0
    assert not again["base_loaded"] and c_result["base_loaded"]
    for name in plain:
        torch.testing.assert_close(again_weights[name], cached[name], rtol=1e-3, atol=1e-4, msg=name)
