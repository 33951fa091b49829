"""Issue 24's items on predictable files, unwritable outputs and writes into an export: each fails on 0.1's code."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from medusa_ray import cli
from medusa_ray.errors import UserError


def test_vllm_logging_config_is_a_private_file_per_process(monkeypatch):
    """Not one fixed path in the shared temp dir that another user could replace with a config whose ``()`` factory
    runs code in vLLM's processes."""
    from medusa_ray import logs

    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    paths = []
    for _ in range(2):
        logs.configure_vllm()
        paths.append(Path(os.environ["VLLM_LOGGING_CONFIG_PATH"]))
    assert paths[0] != paths[1]
    for path in paths:
        info = path.stat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o600
        assert json.loads(path.read_text())["loggers"]["vllm"]["propagate"] is False


def test_run_file_mirrors_refuse_a_directory_others_can_write(tmp_path, monkeypatch):
    """A remote run's files are mirrored under the temp dir: in a directory of this user's own, never one another
    user made (or can write) first."""
    import tempfile

    from medusa_ray.train import run_files

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mirror = run_files.local_dir("s3://bucket/runs/demo")
    assert mirror.name == "demo" and stat.S_IMODE(mirror.parent.parent.stat().st_mode) == 0o700

    planted = tmp_path / f"medusa-ray-runs-{os.getuid()}"
    planted.chmod(0o777)
    with pytest.raises(UserError, match="writable by others"):
        run_files.local_dir("s3://bucket/runs/demo")
    planted.chmod(0o700)
    os.chown(planted, 4242, 4242) if os.getuid() == 0 else pytest.skip("needs root to plant another user's dir")
    with pytest.raises(UserError, match="owned by uid 4242"):
        run_files.local_dir("s3://bucket/runs/demo")


def test_an_unwritable_output_is_one_line_before_anything_starts(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert cli.main(["distill", f"distill.input={prompts}", "distill.output_dir=/proc/nope/out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medusa-ray distill: error: distill.output_dir=/proc/nope/out: cannot write there "
                   "(No such file or directory)"]


def test_pipeline_checks_every_later_stage_s_location_before_distilling(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    distilled = tmp_path / "distilled"
    code = cli.main(["pipeline", f"distill.input={prompts}", f"distill.output_dir={distilled}",
                     "export.output_dir=/proc/nope/export", f"train.storage_path={tmp_path / 'runs'}"])
    assert code == 2
    assert "export.output_dir=/proc/nope: cannot write there" in capsys.readouterr().err
    assert not (distilled / "_pipeline").exists()  # nothing distilled, no split written


def test_eval_writes_into_an_export_only_under_its_lock(tmp_path):
    """Eval annotates the export (numbers, card) while nobody rewrites it: a held export lock is respected."""
    import socket

    from medusa_ray import evaluate
    from medusa_ray.export import EVAL_FILE, MARKER_FILE
    from medusa_ray.locks import lock_path

    out = tmp_path / "export"
    out.mkdir()
    (out / MARKER_FILE).write_text(json.dumps({"format": "medusa-ray-export/1"}))
    # Another live process on this host (pid 1) is re-exporting into it.
    lock_path(out).write_text(json.dumps({"what": "export", "host": socket.gethostname(), "pid": 1,
                                          "nonce": "theirs", "started": 0}))
    with pytest.raises(UserError, match="in use by"):
        evaluate._save({"acceptance_length": 1.5}, out, None)
    assert not (out / EVAL_FILE).exists()


def _medusa_checkpoint(directory: Path, base: Path, heads: int = 2) -> Path:
    """A checkpoint as training writes one, for a Medusa drafter on ``base`` (built here, untrained)."""
    import torch
    from transformers import AutoConfig

    from medusa_ray import checkpoint
    from medusa_ray.model.base import base_lm_head
    from medusa_ray.model.heads import MedusaHeads

    text = AutoConfig.from_pretrained(base)
    module = MedusaHeads(heads, 1, base_lm_head(str(base)))
    directory.mkdir(parents=True)
    meta = checkpoint.Meta(method="medusa", global_step=1, base_model=str(base), hidden_size=text.hidden_size,
                           vocab_size=text.vocab_size, shape={"medusa_num_heads": heads, "medusa_num_layers": 1,
                                                              "share_lm_head": False})
    checkpoint.write(directory, meta, {k: v.to(torch.float32).contiguous() for k, v in module.state_dict().items()})
    return directory


def test_a_local_base_s_path_is_never_published(tmp_path, random_tiny_model):
    """The base's absolute path (a home directory) is in no file that is uploaded: the marker, config.json and the
    card name it redacted, the card says what TGI needs, and eval still finds the base through the local file."""
    import shutil

    from medusa_ray import export
    from medusa_ray.config import build_config
    from medusa_ray.export import LOCAL_FILE, local_base

    base = tmp_path / "home" / "alice" / "models" / "tiny"
    shutil.copytree(random_tiny_model, base)
    ckpt = _medusa_checkpoint(tmp_path / "ckpt", base)
    out = export.run(build_config({}, [f"model={base}", f"export.output_dir={tmp_path / 'exp'}"]),
                     checkpoint=str(ckpt)).path
    published = [p for p in out.rglob("*") if p.is_file() and p.name != LOCAL_FILE]
    assert [p.name for p in published if str(tmp_path).encode() in p.read_bytes() or b"alice" in p.read_bytes()] == []
    assert json.loads((out / "config.json").read_text())["base_model_name_or_path"] == "models/tiny"
    assert "set `base_model_name_or_path` in `config.json`" in (out / "README.md").read_text()
    assert local_base(out) == str(base)
