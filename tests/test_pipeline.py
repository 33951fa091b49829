"""`medusa-ray pipeline` end to end on the tiny model: killed during training, re-run, finished.

One scenario covers issue 3's two checks at once: the second run must skip distillation, resume training from
its checkpoint, and then produce an export that vLLM loads, with identical greedy outputs and trained heads
accepting more than untrained ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import wait_for

from medusa_ray.data import read_conversations
from medusa_ray.train import find_latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
NUM_CONVERSATIONS = 40
EVAL_PROMPTS = 8


def _config(tmp_path: Path, model: Path, address: str) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    lines = (REPO / "examples" / "demo_prompts.jsonl").read_text().splitlines()[:NUM_CONVERSATIONS]
    prompts.write_text("\n".join(lines) + "\n")
    engine = {"max_model_len": 256, "enforce_eager": True, "gpu_memory_utilization": 0.1}
    config = {
        "model": str(model),
        "ray": {"address": address},
        "distill": {"input": str(prompts), "output_dir": str(tmp_path / "distilled"), "max_tokens": 48,
                    "shard_size": 16, "engine_kwargs": engine},
        "train": {"medusa_num_heads": 3, "num_workers": 2, "zero_stage": 2, "batch_size": 8, "lr": 0.003,
                  "warmup_steps": 2, "max_steps": 20, "checkpoint_every": 5, "max_length": 192,
                  "storage_path": str(tmp_path / "ray_results"), "run_name": "pipe", "tracking": []},
        "export": {"output_dir": str(tmp_path / "export")},
        "eval": {"num_prompts": EVAL_PROMPTS, "max_tokens": 32, "engine_kwargs": engine},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _pipeline(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medusa_ray", "pipeline", "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )


@pytest.mark.slow
def test_pipeline_killed_in_training_resumes_and_finishes(tiny_model, ray_session, tmp_path):
    # The runs join the session's cluster, so killing a driver takes its Ray Train workers with it.
    address = ray_session.get_runtime_context().gcs_address
    config = _config(tmp_path, tiny_model, address)
    storage, distilled = tmp_path / "ray_results", tmp_path / "distilled"

    first = _pipeline(config, tmp_path / "first.log")
    try:
        # Killed the moment its first checkpoint (step 5 of 20) is registered, well inside the window.
        wait_for(lambda: find_latest_checkpoint(str(storage), "pipe"), 900, "no training checkpoint appeared",
                 alive=lambda: first.poll() is not None and (tmp_path / "first.log").read_text()[-3000:])
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = json.loads((Path(find_latest_checkpoint(str(storage), "pipe")) / "draft_meta.json").read_text())
    assert 5 <= killed_at["global_step"] < 20
    shards = {p: p.stat().st_mtime_ns for p in distilled.glob("*.parquet")}
    assert shards, "distillation wrote nothing before training started"

    second = _pipeline(config, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-4000:]
    log = (tmp_path / "second.log").read_text()

    # Distillation was not redone: same shards, untouched.
    assert "distill: already complete" in log
    assert {p: p.stat().st_mtime_ns for p in distilled.glob("*.parquet")} == shards
    summary = json.loads((distilled / "_pipeline" / "pipeline_summary.json").read_text())
    # Every distilled prompt is a training row, or recorded as an error (failed, empty) and never trained on.
    # The prompts' distinct conversations minus the held-back ones were distilled.
    distinct = len(read_conversations(tmp_path / "prompts.jsonl").conversations)
    held_back = len((distilled / "_pipeline" / "heldout_prompts.jsonl").read_text().splitlines())
    assert held_back == min(EVAL_PROMPTS, distinct // 5)
    errors = sum(pq.ParquetFile(p).metadata.num_rows for p in (distilled / "errors").glob("*.parquet"))
    assert summary["rows_distilled"] + errors == distinct - held_back
    assert summary["rows_distilled"] >= distinct - held_back - 2

    # Training resumed from the killed run's checkpoint and reached the requested step.
    assert summary["train_resumed_from"] >= killed_at["global_step"]
    assert summary["train_steps"] == 20
    final = find_latest_checkpoint(str(storage), "pipe")
    assert json.loads((Path(final) / "draft_meta.json").read_text())["global_step"] == 20

    # The export loaded in vLLM as a Medusa drafter: it drafted, never changed greedy outputs, and trained
    # heads got more tokens accepted than the same heads before training.
    export = Path(summary["export_dir"])
    assert (export / "medusa_lm_head.safetensors").is_file()
    results = json.loads((export / "eval_results.json").read_text())
    assert results["num_drafts"] > 0
    assert summary["outputs_identical"] is True
    assert summary["acceptance_length"] > summary["acceptance_length_untrained"]


def test_stage_state_made_with_other_settings_is_refused(tmp_path):
    """Changing the model (or the prompts) under an existing output dir must not reuse what was made before."""
    from medusa_ray import pipeline
    from medusa_ray.config import load_config
    from medusa_ray.errors import UserError

    cfg = load_config(str(_config(tmp_path, tmp_path / "model-a", "")))
    work = pipeline._work_dir(cfg)
    split = pipeline._split_heldout(cfg, work)
    assert read_conversations(split.eval.prompts).conversations  # the split was written once
    (work / "distill_done.json").write_text(json.dumps({"rows_out_total": 32, "nodes": []}))
    assert pipeline._distill(split, work)[0] == 32  # same settings: distillation is complete, skipped

    fewer = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"limit": 20})})
    with pytest.raises(UserError, match="holds the held-out split of another configuration .*distill.limit=None -> 20"):
        pipeline._split_heldout(fewer, work)
    other_model = split.model_copy(update={"model": str(tmp_path / "model-b")})
    with pytest.raises(UserError, match="holds distilled rows of another configuration .*model-a' -> .*model-b'"):
        pipeline._distill(other_model, work)
