"""A base bigger than one worker should hold: per-worker memory with the base replicated or sharded, and what the
feature cache saves after the first pass.

    .venv/bin/python benchmarks/big_base.py                 # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/big_base.py --skip-memory   # the cache's speed only

Everything is built here (random Llama weights, the tiny corpus's tokenizer): nothing is downloaded. Training runs
the worker loop (``run_loop``) in two processes over gloo, as two Ray Train workers would, without Ray (whose own
processes would blur the per-process numbers); each process reports its peak RSS.

1. **Memory.** A random Llama of about 2.4 GiB in fp32, saved in 500 MB safetensors files as large models come,
   trains Medusa heads for one epoch with 2 workers, three ways: the base replicated (each worker loads it whole),
   sharded (``train.shard_base``: ZeRO-3 partitions, loaded tensor by tensor; its feature cache fills), and from
   the features alone (the same run again: the cache holds every row, so the base is not loaded). Then the same
   for an EAGLE-3 draft. Peak memory is each process's VmHWM.
2. **Feature cache.** A smaller base whose forward pass dominates the step trains Medusa heads for 3 epochs with
   ``train.feature_cache`` off and on: tokens/s of the first epoch (the base runs, features are written) against
   the later ones (read back), and the cache's size on disk.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2


def _worker(rank: int, port: int, overrides: list[str], data: str, out: str, run: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import logging

    import torch
    import torch.distributed as dist

    from medusa_ray.config import build_config
    from medusa_ray.train import features, plan_schedule
    from medusa_ray.train.plan import make_plan
    from medusa_ray.train.worker import LocalSession, prepare_drafter, run_loop

    logging.disable(logging.WARNING)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = build_config({}, overrides)
    plan = make_plan([data], 0, cfg.train.val_fraction, 2, 100, world=WORLD)
    started = time.perf_counter()
    complete = cfg.train.feature_cache is True and features.holds_every_row(run, plan)  # as the driver decides
    result = run_loop(cfg, LocalSession(torch.device("cpu"), Path(out) / f"checkpoints-{rank}"), plan,
                      plan_schedule(cfg.train, plan.train_rows), run,
                      prepared=prepare_drafter(cfg.to_dict(), plan.to_dict()), features_complete=complete)
    result["seconds"] = time.perf_counter() - started
    (Path(out) / f"result-{rank}.json").write_text(json.dumps(result, default=str))
    dist.destroy_process_group()


def train(out: Path, overrides: list[str], data: Path, run: Path | None = None) -> list[dict]:
    """Two workers' results (rank order). ``run``: the run's directory (default: a new one in ``out``); a feature
    cache there is readied as the driver does."""
    from medusa_ray.train import features

    out.mkdir(parents=True)
    run = run or out / "run"
    if "train.feature_cache=true" in overrides and not (run / features.DIR / features.SPEC).is_file():
        features.prepare(str(run), {"benchmark": 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, port, overrides, str(data), str(out), str(run))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"training in {out} failed: exit codes {[p.exitcode for p in procs]}")
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(WORLD)]


def write_rows(path: Path, n: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medusa_ray.tiny import corpus

    rows = [{"id": f"c{i}", "messages": m, "mode": "chat"} for i, m in enumerate(corpus.conversations(n, seed=5))]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def memory(work: Path) -> None:
    from medusa_ray.tiny import make_tiny_model

    started = time.perf_counter()
    model = make_tiny_model(work / "big", hidden_size=2048, num_layers=12, max_shard_size="500MB")
    files = sorted(model.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / 2**30
    print(f"base: random Llama, hidden 2048, 12 layers, {size:.2f} GiB fp32 in {len(files)} files "
          f"(built in {time.perf_counter() - started:.0f} s)\n", flush=True)
    data = write_rows(work / "rows.parquet", 16)
    common = [f"model={model}", "train.zero_stage=2", "train.batch_size=1", "train.epochs=1", "train.max_length=64",
              "train.warmup_steps=0", "train.tracking=[]", "train.val_fraction=0", "train.medusa_num_heads=2",
              "train.share_lm_head=true", "train.eagle3_draft_vocab_size=256"]
    roads = {"replicated": ["train.shard_base=false", "train.feature_cache=false"],
             "sharded": ["train.shard_base=true", "train.feature_cache=true"],  # fills the cache...
             "features": ["train.shard_base=true", "train.feature_cache=true"]}  # ...which this run reads alone
    rows = []
    for method in ("medusa", "eagle3"):
        for road, keys in roads.items():
            results = train(work / f"{method}-{road}", common + [f"train.method={method}"] + keys, data,
                            run=work / f"{method}-cached-run" if road != "replicated" else None)
            assert results[0]["base_loaded"] == (road != "features"), (road, results[0]["base_loaded"])
            peaks = [r["peak_memory_mib"] / 1024 for r in results]
            rows.append((method, road, peaks, max(r["seconds"] for r in results)))
            print(f"  {method} {road}: peak RSS per worker {', '.join(f'{p:.2f}' for p in peaks)} GiB", flush=True)
    print("\n| drafter | base | peak RSS per worker (GiB) | below replicated (GiB) | x base size | wall (s) |")
    print("|---|---|---|---|---|---|")
    for method, road, peaks, seconds in rows:
        replicated = max(next(p for m, r, p, _ in rows if m == method and r == "replicated"))
        saved = replicated - max(peaks)
        print(f"| {method} | {road} | {' / '.join(f'{p:.2f}' for p in peaks)} | {saved:.2f} | "
              f"{saved / size:.2f} | {seconds:.0f} |")
    print(f"\n(the base: {size:.2f} GiB; goal: at least 0.4 x the base below replicated. features: a run whose "
          "cache already holds every row (a retry, a resume) does not load the base)\n", flush=True)


def cache(work: Path) -> None:
    from medusa_ray.tiny import make_tiny_model

    model = make_tiny_model(work / "deep", hidden_size=1024, num_layers=8)
    data = write_rows(work / "rows-cache.parquet", 96)
    common = [f"model={model}", "train.zero_stage=2", "train.batch_size=4", "train.epochs=3", "train.max_length=128",
              "train.warmup_steps=0", "train.tracking=[]", "train.val_fraction=0", "train.medusa_num_heads=3",
              "train.share_lm_head=true"]
    table = []
    for on in (False, True):
        out = work / f"cache-{on}"
        results = train(out, common + [f"train.feature_cache={str(on).lower()}"], data)
        steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        by_epoch: dict[int, list[float]] = {}
        for s in steps[1:]:  # the first step includes the ranks' warm-up
            by_epoch.setdefault(s["epoch"], []).append(s["tokens_per_s"])
        first = statistics.median(by_epoch[0])
        later = statistics.median([x for e, xs in by_epoch.items() if e > 0 for x in xs])
        cache_bytes = sum(f.stat().st_size for f in (out / "run" / "features").glob("*.safetensors")) if on else 0
        table.append((on, first, later, cache_bytes, results[0]["seconds"]))
    print("| feature cache | epoch 1 tokens/s | epochs 2-3 tokens/s | later / first | cache on disk | wall (s) |")
    print("|---|---|---|---|---|---|")
    for on, first, later, size, seconds in table:
        print(f"| {'on' if on else 'off'} | {first:.0f} | {later:.0f} | {later / first:.1f}x | "
              f"{size / 2**20:.1f} MiB | {seconds:.0f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-cache", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medusa-ray-big-base-") as tmp:
        work = Path(tmp)
        if not args.skip_memory:
            memory(work)
        if not args.skip_cache:
            cache(work)


if __name__ == "__main__":
    main()
