"""Medusa vs EAGLE-3 on the same distilled data: training throughput and memory, vLLM acceptance and speed-up.

    .venv/bin/python benchmarks/drafters.py                  # the demo's model and prompts, ~25 min on 2 cores
    .venv/bin/python benchmarks/drafters.py --steps 300

One ``medusa-ray pipeline`` run with ``train.method=[medusa, eagle3]``: the prompts are distilled once, each
drafter trains on the same rows for the same number of optimizer steps (same workers, ZeRO stage, batch and
learning-rate schedule), is exported, and is measured by ``medusa-ray eval`` in vLLM on the same held-back
prompts, next to an untrained drafter of the same shape. Training tokens/s is over the optimizer steps (all
workers; validation excluded); peak memory is rank 0's (resident memory on CPU, allocated GPU memory on a GPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "outputs" / "demo" / "tiny-model"),
                    help="base model dir (default: the demo's, built if missing)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps for each drafter")
    ap.add_argument("--work-dir", help="default: a temp dir")
    args = ap.parse_args()

    model = Path(args.model)
    if not (model / "config.json").exists():
        from medusa_ray.tiny import make_tiny_model

        make_tiny_model(model, pretrain_steps=300)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="drafters-"))
    overrides = [
        f"model={model}", f"distill.output_dir={work / 'distilled'}", f"train.storage_path={work / 'runs'}",
        f"export.output_dir={work / 'export'}", "train.method=[medusa, eagle3]", f"train.max_steps={args.steps}",
        f"train.checkpoint_every={max(args.steps // 4, 1)}", "train.warmup_steps=10",
        "eval.engine_kwargs={max_model_len: 512, enforce_eager: true, gpu_memory_utilization: 0.1, dtype: float32}",
    ]
    proc = subprocess.run([sys.executable, "-m", "medusa_ray", "pipeline", "--config", str(ROOT / "configs/demo.yaml"),
                           *overrides], cwd=ROOT, text=True, capture_output=True)
    if proc.returncode:
        raise SystemExit(f"pipeline failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((work / "distilled" / "_pipeline" / "pipeline_summary.json").read_text())

    print(f"\nMedusa vs EAGLE-3: {summary['rows_distilled']} distilled rows, {args.steps} steps each, model {model}")
    head = (f"{'drafter':<8}{'train tok/s':>12}{'peak MiB':>10}{'val. estimate':>15}{'acceptance':>12}"
            f"{'untrained':>11}{'speed-up':>10}{'identical':>11}")
    print(head)
    for method, c in summary["compared"].items():
        def f(key, fmt):
            return format(c[key], fmt) if c.get(key) is not None else "-"

        print(f"{method:<8}{f('train_tokens_per_s', '.0f'):>12}{f('train_peak_memory_mib', '.0f'):>10}"
              f"{f('expected_acceptance', '.3f'):>15}{f('acceptance_length', '.3f'):>12}"
              f"{f('acceptance_length_untrained', '.3f'):>11}{f('speedup', '.2f'):>10}"
              f"{str(c.get('outputs_identical')):>11}")
    print(f"faster: {summary['method']}")
    (work / "drafters.json").write_text(json.dumps(summary["compared"], indent=2))


if __name__ == "__main__":
    main()
