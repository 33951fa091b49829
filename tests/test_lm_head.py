"""The base model's output projection is read as one tensor from its safetensors files, never by loading the
model: export and eval run on nodes whose memory would not hold an 8B model in fp32."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from medusa_ray.errors import UserError
from medusa_ray.model.base import base_lm_head


def _model(tmp_path, name: str, tied: bool, max_shard_size: str | None = None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    out = tmp_path / name
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out, model.get_output_embeddings().weight.detach().clone()


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("tied", [False, True], ids=["own-lm-head", "tied-embeddings"])
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["one-file", "sharded"])
def test_lm_head_read_from_safetensors_alone(tmp_path, no_model_loading, tied, shard):
    path, expected = _model(tmp_path, "m", tied, shard)
    if shard:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    got = base_lm_head(str(path))
    assert got.dtype == torch.float32 and torch.equal(got, expected.float())


def test_a_model_without_safetensors_is_one_line(tmp_path, no_model_loading):
    path, _ = _model(tmp_path, "m", tied=False)
    (path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no safetensors weight named lm_head.weight"):
        base_lm_head(str(path))
