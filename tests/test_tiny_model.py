"""The embedded tiny model is a real model directory: transformers and vLLM load and generate from it."""

import json

import pytest
import torch


def test_transformers_loads_and_generates(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count from 3 to 9."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    # Pretraining gave it structure: a counting prompt yields digits and commas, not noise.
    assert any(ch.isdigit() for ch in text) and "," in text, text


def test_random_weights_differ_from_pretrained(tiny_model, random_tiny_model):
    from safetensors.torch import load_file

    a = load_file(tiny_model / "model.safetensors")
    b = load_file(random_tiny_model / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


@pytest.mark.slow
def test_vllm_loads_and_generates_same_as_transformers(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    messages = [{"role": "user", "content": "Name the days of the week starting with Friday."}]
    llm = LLM(model=str(tiny_model), gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=256, seed=0)
    try:
        out = llm.chat([messages], SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    finally:
        del llm
    assert out.token_ids, "vLLM generated nothing"

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = model.generate(**prompt, max_new_tokens=24, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    # Same greedy tokens from both engines (fp32 on CPU); compare a prefix to stay clear of near-ties.
    n = min(8, len(out.token_ids))
    assert list(out.token_ids[:n]) == ref[:n].tolist()
