"""Fail before the work: unwritable or full output locations and missing local models are one line, up front."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest

from medusa_ray.config import build_config
from medusa_ray.paths import check_local_model
from medusa_ray.errors import UserError
from medusa_ray.writable import check_writable


def test_unwritable_and_full_locations_are_refused(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made under a file, not even by root
    with pytest.raises(UserError, match=f"distill.output_dir={blocker}/out: cannot write there"):
        check_writable(blocker / "out", "distill.output_dir")

    check_writable(tmp_path / "fine", "x")
    assert list((tmp_path / "fine").iterdir()) == []  # the probe leaves nothing behind

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 * 2**30, 10 * 2**30 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(UserError, match="only 5 MiB free"):
        check_writable(tmp_path / "fine", "train.storage_path")


def test_stages_check_their_outputs_before_working(tmp_path, random_tiny_model):
    from medusa_ray import distill, evaluate, train
    from helpers import write_distilled

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    data = write_distilled(tmp_path / "data", n=16, model=str(random_tiny_model))
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))

    cfg = build_config({}, [f"model={random_tiny_model}", f"distill.input={prompts}",
                            f"distill.output_dir={blocker}/distilled", f"train.data={data}",
                            f"train.storage_path={blocker}/runs", f"eval.prompts={prompts}",
                            f"eval.output_json={blocker}/eval.json", "train.tracking=[]"])
    with pytest.raises(UserError, match="distill.output_dir=.*cannot write there"):
        distill.run(cfg)
    with pytest.raises(UserError, match="train.storage_path=.*cannot write there"):
        train.run(cfg)
    with pytest.raises(UserError, match="eval.output_json=.*cannot write there"):
        evaluate.run(cfg, draft_dir=str(heads))


def test_eval_prints_its_results_before_writing_them(tmp_path, monkeypatch, capsys):
    from medusa_ray import cluster, evaluate

    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "config.json").write_text(json.dumps({"medusa_num_heads": 2}))
    results = {"num_prompts": 4, "num_speculative_tokens": 2, "acceptance_length": 1.75,
               "accepted_per_position": [0.5, 0.25], "num_drafts": 8, "tokens_per_s_base": 10.0,
               "tokens_per_s_draft": 15.0, "method": "medusa", "speedup": 1.5, "outputs_identical": True, "errors": []}
    monkeypatch.setattr(cluster, "run_task", lambda *a, **k: dict(results))

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "_save", disk_full)
    cfg = build_config({}, [f"eval.prompts={tmp_path}/p.jsonl", f"eval.output_json={tmp_path}/eval.json"])
    with pytest.raises(OSError, match="No space"):
        evaluate.run(cfg, draft_dir=str(heads))
    assert "1.750" in capsys.readouterr().out  # the hour of decoding is on screen even so


def test_a_missing_local_model_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, random_tiny_model):
    from medusa_ray import train
    from helpers import write_distilled

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for local in ("outputs/tiny-model", "./tiny", "/nowhere/models/tiny", "~/no-such-model-dir", "a/b/c"):
        with pytest.raises(UserError, match=f"model={local}: no such directory"):
            check_local_model(local)
    for hub_id in ("meta-llama/Llama-3.1-8B-Instruct", "gpt2", str(random_tiny_model)):
        check_local_model(hub_id)

    data = write_distilled(tmp_path / "data", n=16, model=str(random_tiny_model))
    cfg = build_config({}, ["model=outputs/tiny-model", f"train.data={data}", "train.tracking=[]",
                            f"train.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match="model=outputs/tiny-model: no such directory"):
        train.run(cfg)
