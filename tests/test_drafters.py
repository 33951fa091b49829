"""Adding a drafter is one module: a test-only drafter, registered here, goes through the config, train's summary,
export, eval's speculative config and the pipeline without any stage knowing its name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field

from medusa_ray import config as config_module
from medusa_ray import drafters
from medusa_ray.config import ConfigError, DrafterKeys, build_config


class DummyKeys(DrafterKeys):
    dummy_steps: int = Field(2, ge=1)
    """Dummy: draft positions."""


class Dummy(drafters.Drafter):
    method = "dummy"
    title = "dummy draft"
    position = "step"
    keys = DummyKeys
    meta_keys = ("dummy_steps",)
    weights_file = "dummy.safetensors"

    @classmethod
    def num_positions(cls, train_cfg) -> int:
        return train_cfg.dummy_steps

    @classmethod
    def shape(cls, train_cfg, hidden_size, vocab_size):
        return {"method": cls.method, "dummy_steps": train_cfg.dummy_steps, "hidden_size": hidden_size,
                "vocab_size": vocab_size}

    @classmethod
    def describe_training(cls, train_cfg, prepared) -> str:
        return f"a dummy draft of {train_cfg.dummy_steps} steps"

    def name(self, k: int) -> str:
        return f"dummy{k}"

    @classmethod
    def export_files(cls, weights, meta, base_name, dtype, published_base):
        def write(tmp: Path) -> None:
            from safetensors.torch import save_file

            save_file(weights, str(tmp / cls.weights_file))
            (tmp / "config.json").write_text(json.dumps({"dummy_steps": meta["dummy_steps"], "base": published_base}))

        return write

    @classmethod
    def describe(cls, meta) -> tuple[str, str]:
        return ("dummy steps", str(meta["dummy_steps"]))

    @classmethod
    def card(cls, meta, base) -> list[str]:
        return [f"# Dummy draft for `{base}`", "", f"{meta['dummy_steps']} steps of nothing."]

    @classmethod
    def detect(cls, config: dict[str, Any]):
        return {"steps": config["dummy_steps"], "base": config["base"]} if "dummy_steps" in config else None


@pytest.fixture
def dummy():
    drafters.register(Dummy)
    yield Dummy
    drafters._REGISTRY.pop("dummy", None)
    config_module._DRAFTER_KEYS.pop("dummy", None)


def test_a_registered_drafter_s_keys_are_config_keys(dummy):
    cfg = build_config({}, ["train.method=dummy", "train.dummy_steps=4"])
    assert cfg.train.dummy_steps == 4 and cfg.train.medusa_num_heads == 3  # every drafter's keys, with defaults
    with pytest.raises(ConfigError, match="train.dummy_steps: Input should be greater than or equal to 1"):
        build_config({}, ["train.dummy_steps=0"])
    assert "`train.dummy_steps`" in config_module.reference_markdown()
    assert build_config({}, ["train.method=[medusa, dummy]"]).methods == ["medusa", "dummy"]


def test_unknown_drafters_and_keys_are_one_line():
    with pytest.raises(ConfigError, match=r"train.method: unknown drafter 'dummy' \(known: medusa, eagle3\)"):
        build_config({}, ["train.method=dummy"])
    with pytest.raises(ConfigError, match="train.dummy_steps: unknown key"):
        build_config({}, ["train.dummy_steps=4"])


def test_it_goes_through_train_export_eval_and_the_pipeline(dummy, tmp_path, random_tiny_model, monkeypatch):
    import torch

    from medusa_ray import checkpoint, cluster, evaluate, export, pipeline
    from medusa_ray.train import TrainResult

    # Registered in this process only (a real drafter is a module of medusa_ray/drafters, which every Ray worker
    # imports): the stages' Ray tasks run here, as they do when Ray is not up.
    monkeypatch.setattr(cluster, "run_task", lambda fn, *args, name, num_cpus=1, num_gpus=0, **kw: fn(*args, **kw))

    cfg = build_config({}, [f"model={random_tiny_model}", "train.method=dummy", "train.dummy_steps=3",
                            f"export.output_dir={tmp_path / 'export'}"])
    # train: what it prints, in the drafter's words.
    result = TrainResult(checkpoint="ckpt", global_step=7, metrics={"dummy0_loss": 1.5, "dummy0_top1": 0.5},
                         method="dummy", train_cfg=cfg.to_dict()["train"])
    summary = result.summary()
    assert summary.startswith("trained dummy draft: step 7") and "step  predicts" in summary
    assert result.top1()[0] == 0.5 and len(result.top1()) == 3

    # export: a checkpoint of the dummy drafter, written by its own writer.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    checkpoint.write(ckpt, checkpoint.Meta(method="dummy", global_step=7, base_model=str(random_tiny_model),
                                           hidden_size=128, vocab_size=729, shape={"dummy_steps": 3}),
                     {"w": torch.ones(2)})
    exported = export.run(cfg, checkpoint=str(ckpt))
    assert (exported.path / "dummy.safetensors").is_file()
    assert exported.marker["meta"]["dummy_steps"] == 3 and "dummy steps  3" in exported.summary()
    card = (exported.path / "README.md").read_text()
    assert "# Dummy draft for" in card and '"method": "dummy"' in card and "TGI does not serve this drafter" in card

    # eval: found by its own detect, run with its own speculative config.
    found, info = drafters.detect(exported.path)
    assert found is Dummy and info["steps"] == 3
    seen = {}

    def engine(base, prompts, max_tokens, kwargs, speculative, progress=False):
        seen.setdefault("speculative", []).append(speculative)
        counters = {evaluate._DRAFTS: 2, evaluate._DRAFT_TOKENS: 6, evaluate._ACCEPTED: 3,
                    evaluate._PER_POS: [2, 1, 0]}
        return [[1, 2, 3]] * len(prompts), 1.0, counters

    monkeypatch.setattr(evaluate, "_run_engine", engine)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    results = evaluate.run(build_config({}, [f"eval.prompts={prompts}"]), draft_dir=str(exported.path))
    assert seen["speculative"] == [None, {"method": "dummy", "model": str(exported.path), "num_speculative_tokens": 3}]
    assert results["method"] == "dummy" and results["acceptance_length"] == 2.5
    assert "tokens/s dummy" in results.summary()

    # pipeline: its own run and export when compared with another drafter.
    per_method = pipeline._for_method(cfg, "dummy", several=True)
    assert per_method.train.method == "dummy" and per_method.train.run_name == "medusa-dummy"
    assert per_method.export.output_dir.endswith("export-dummy")
