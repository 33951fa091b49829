"""``train.storage_path=s3://...`` end to end against a real S3 protocol server (moto's server mode on loopback),
reached the way users reach MinIO or R2: ``AWS_ENDPOINT_URL``. Train, re-run (resumes, says from where), export
without ``--checkpoint``; everything the run writes lands in the bucket. Each step is the CLI in a subprocess,
as a user runs it, with its own local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import S3_BUCKET as BUCKET
from helpers import write_distilled

pytestmark = pytest.mark.slow


def _bucket(env):
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], scheme="http", access_key="testing",
                                   secret_key="testing", region="us-east-1")


def _cli(args: list[str], env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "medusa_ray", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_train_resume_and_export_on_s3(s3_env, random_tiny_model, tmp_path, monkeypatch):
    data = write_distilled(tmp_path / "distilled", n=64, model=str(random_tiny_model))
    storage = f"s3://{BUCKET}/runs"
    common = [f"model={random_tiny_model}", f"train.data={data}", f"train.storage_path={storage}",
              "train.run_name=s3run", "train.num_workers=1", "train.zero_stage=2", "train.batch_size=4",
              "train.max_length=128", "train.warmup_steps=0", "train.checkpoint_every=2",
              "train.tracking=[tensorboard]", "ray.num_cpus=4"]
    # A stale mirror left on this node by an earlier run of the same name must not leak into this one.
    from medusa_ray.train import run_files

    stale = run_files.local_dir(f"{storage}/s3run")
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "metrics.jsonl").write_text('{"step": 99}\n')
    first = _cli(["train", *common, "train.max_steps=4"], s3_env, tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "resuming" not in first.stdout

    fs = _bucket(s3_env)
    import pyarrow.fs

    def listing() -> set[str]:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{BUCKET}/runs/s3run", recursive=True))
        return {i.path.removeprefix(f"{BUCKET}/runs/s3run/") for i in infos}

    files = listing()
    assert "checkpoint_step00000004/draft_meta.json" in files
    # The run's own files live in the run's storage, not on the node rank 0 ran on.
    assert {"metrics.jsonl", "tracking.json", "head_losses.png"} <= files
    assert any(f.startswith("tensorboard/") for f in files)
    assert not (tmp_path / "outputs").exists()

    # Re-running with more steps resumes from the step-4 checkpoint in the bucket, and says so in one line.
    second = _cli(["train", *common, "train.max_steps=6"], s3_env, tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    resume_lines = [line for line in second.stdout.splitlines() if line.startswith("resuming run")]
    assert resume_lines == [f"resuming run 's3run' from step 4 ({storage}/s3run/checkpoint_step00000004)"]
    with fs.open_input_stream(f"{BUCKET}/runs/s3run/metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f.read().decode().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    # Export without --checkpoint picks the run's best validated checkpoint from the bucket, and says which.
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    from medusa_ray.checkpoint import best_checkpoint, run_checkpoints

    found = run_checkpoints(storage, "s3run")
    assert found[-1].step == 6 and all(c.uri.startswith(f"{storage}/s3run/checkpoint_step") for c in found)
    best = best_checkpoint(found)
    out = tmp_path / "export"
    exported = _cli(["export", *common, f"export.output_dir={out}"], s3_env, tmp_path)
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert f"exporting step {best.step} of run 's3run': best validation expected acceptance" in exported.stdout
    marker = json.loads((out / "medusa_ray_export.json").read_text())
    from medusa_ray.export.public import redact, source_id

    assert marker["source"] == {"checkpoint": redact(best.uri), "id": source_id(best.uri), "global_step": best.step}
    assert "s3run" not in marker["source"]["checkpoint"]  # the bucket's paths are not published
    assert (out / "medusa_lm_head.safetensors").stat().st_size > 0


def test_output_dirs_on_object_storage_are_refused_in_one_line(s3_env, random_tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    distill = _cli(["distill", f"model={random_tiny_model}", f"distill.input={prompts}",
                    f"distill.output_dir=s3://{BUCKET}/distill"], s3_env, tmp_path)
    assert distill.returncode == 2
    assert distill.stderr.strip().splitlines() == [
        f"medusa-ray distill: error: distill.output_dir=s3://{BUCKET}/distill: must be a local or shared-filesystem "
        "path (shards are renamed into place when complete, which object storage cannot do atomically)"]
    assert not (tmp_path / "s3:").exists()
    export = _cli(["export", f"model={random_tiny_model}", f"export.output_dir=s3://{BUCKET}/export",
                   "--checkpoint", str(tmp_path)], s3_env, tmp_path)
    assert export.returncode == 2
    assert len(export.stderr.strip().splitlines()) == 1 and "export.output_dir=s3://" in export.stderr
