"""The first thing to run on a CUDA machine: the GPU paths end to end, in one process, in about a minute.

    .venv/bin/python benchmarks/gpu_smoke.py [--model DIR] [--steps 30] [--out DIR] [--method medusa|eagle3]

1. The worker's training loop (``medusa_ray.train.worker.run_loop``) without Ray, in bf16 on one GPU, under an
   NCCL process group of world size 1: the collectives, DeepSpeed and the loss run exactly as on a Ray Train
   GPU worker (NCCL refuses CPU tensors, so a CPU tensor left in a collective fails here).
2. ``export`` of the checkpoint it wrote, and a vLLM eval of that export (speculative decoding vs plain).
   ``--method eagle3`` does the same for an EAGLE-3 draft (its online hidden states, the vocabulary task's
   maps, the speculators export, vLLM's ``eagle3`` proposer).
3. One JSON line: training tokens/s, peak GPU memory, acceptance length, speed-up, greedy outputs identical.

Without ``--model`` it builds and briefly pretrains the embedded tiny Llama (nothing is downloaded). Not run in
CI (no GPU there); it refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]


def _write_rows(path: Path, n: int) -> Path:
    """``n`` tiny-corpus conversations in the distill output format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medusa_ray.tiny import corpus

    rows = [{"id": f"c{i}", "messages": m, "mode": "chat"} for i, m in enumerate(corpus.conversations(n, seed=3))]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path / "part-00000.parquet")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model dir or Hub id (default: the embedded tiny Llama)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--method", choices=["medusa", "eagle3"], default="medusa")
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="medusa-gpu-smoke-"))
    model = args.model
    if model is None:
        from medusa_ray.tiny import make_tiny_model

        model = str(make_tiny_model(out / "tiny-model", pretrain_steps=300))

    from medusa_ray.config import build_config
    from medusa_ray.train import plan_schedule
    from medusa_ray.train.plan import make_plan
    from medusa_ray.train.worker import LocalSession, run_loop

    data = _write_rows(out / "distilled", args.rows)
    cfg = build_config({}, [f"model={model}", f"train.data={data}", "train.zero_stage=2", "train.batch_size=8",
                            "train.lr=3e-3", f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}",
                            "train.warmup_steps=3", "train.max_length=256", "train.tracking=[]",
                            f"export.output_dir={out / 'export'}", f"eval.prompts={REPO / 'examples' / 'demo_prompts.jsonl'}",
                            "eval.num_prompts=32", "eval.max_tokens=64", "eval.compare_untrained=true",
                            f"train.method={args.method}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    device = torch.device("cuda", 0)
    session = LocalSession(device, out / "checkpoints")
    plan = make_plan([str(p) for p in sorted(data.glob("*.parquet"))], 0, cfg.train.val_fraction,
                     cfg.train.val_min_rows, cfg.train.val_max_rows)
    from medusa_ray.train.worker import prepare_drafter

    prepared = prepare_drafter(cfg.to_dict(), plan.to_dict())  # in a Ray task in `train`; here in-process
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_loop(cfg, session, plan, plan_schedule(cfg.train, plan.train_rows), str(out / "run"), prepared=prepared)
    train_s = time.perf_counter() - t0
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    dist.destroy_process_group()

    from medusa_ray import evaluate, export

    export_dir = export.run(cfg, checkpoint=str(session.checkpoints[-1])).path
    torch.cuda.empty_cache()
    results = evaluate.run(cfg, draft_dir=str(export_dir), compare_untrained=True)
    untrained = results.get("compared", {}).get("untrained", {})
    print(json.dumps({
        "device": torch.cuda.get_device_name(0),
        "method": args.method,
        "train_steps": result["progress"]["step"],
        "val_expected_acceptance": round(result["validation"].get("expected_acceptance", float("nan")), 3),
        "train_tokens_per_s": round(result["progress"]["tokens"] / train_s, 1),
        "train_peak_gpu_gib": round(peak_gib, 3),
        "acceptance_length": round(results["acceptance_length"], 3),
        "acceptance_length_untrained": round(untrained.get("acceptance_length", float("nan")), 3),
        "speedup": round(results["speedup"], 3),
        "outputs_identical": results["outputs_identical"],
        "out": str(out),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
