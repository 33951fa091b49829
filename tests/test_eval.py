"""evaluate without engines: prompt reading, refusals, per-head accuracy, the PNG.

The vLLM part (acceptance, identical outputs, trained > untrained) runs in test_export.py on the heads that
``train.run`` produced there, so the engines are started once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medusa_ray.config import build_config
from medusa_ray.errors import UserError
from medusa_ray.data import read_prompts

CONV = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Count from 1 to 5."},
    {"role": "assistant", "content": "1, 2, 3, 4, 5."},
    {"role": "user", "content": "Spell the word tiger."},
    {"role": "assistant", "content": "t-i-g-e-r."},
]


def test_prompts_are_the_turns_before_the_first_answer(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"messages": CONV}) + "\n\n" + json.dumps({"messages": CONV[1:3]}) + "\n")
    assert read_prompts(str(jsonl), 10) == [CONV[:2], [CONV[1]]]
    assert read_prompts(str(jsonl), 1) == [CONV[:2]]

    # Eval reads prompts as distill does: every ShareGPT speaker distill accepts, "model" included.
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"},
                                                       {"from": "model", "value": "hello"}]}]))
    assert read_prompts(str(sharegpt), 10) == [[{"role": "user", "content": "hi"}]]
    # A bare prompt row is a one-turn chat, or raw text when the run distils in completion mode.
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "Once upon"}) + "\n")
    assert read_prompts(str(bare), 10) == [[{"role": "user", "content": "Once upon"}]]
    assert read_prompts(str(bare), 10, mode="completion") == ["Once upon"]


def test_distilled_parquet_prompts_keep_their_mode(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": CONV, "mode": "chat"},
            {"messages": [{"role": "user", "content": "Once upon"}, {"role": "assistant", "content": " a time"}],
             "mode": "completion"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "shard.parquet")
    assert read_prompts(str(tmp_path), 10) == [CONV[:2], "Once upon"]


def test_bad_prompt_files_name_the_place(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONV}) + "\n{oops\n")
    with pytest.raises(UserError, match="bad.jsonl:2: not valid JSON"):
        read_prompts(str(bad), 10)
    no_user = tmp_path / "no_user.jsonl"
    no_user.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="no_user.jsonl:1: no user turn"):
        read_prompts(str(no_user), 10)
    late_user = tmp_path / "late_user.jsonl"
    late_user.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"},
                                                  {"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(UserError, match="late_user.jsonl:1: no user turn before the first assistant turn"):
        read_prompts(str(late_user), 10)
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.jsonl"), 10)


def _export_like(out: Path, base: Path, heads: int = 2) -> Path:
    """An export-shaped dir with untrained heads of ``base`` (what MedusaHeads starts from)."""
    from safetensors.torch import load_file, save_file

    from medusa_ray.model.heads import MedusaHeads

    lm_head = load_file(str(base / "model.safetensors"))["lm_head.weight"]
    out.mkdir(parents=True)
    medusa = MedusaHeads(heads, 1, lm_head)
    save_file({k: v.contiguous() for k, v in medusa.state_dict().items()}, str(out / "medusa_lm_head.safetensors"))
    (out / "config.json").write_text(json.dumps({
        "model_type": "medusa", "medusa_num_heads": heads, "medusa_num_layers": 1, "hidden_size": lm_head.shape[1],
        "vocab_size": lm_head.shape[0], "medusa_fc_bias": True, "base_model_name_or_path": str(base)}))
    return out


def test_eval_refuses_before_starting_engines(tmp_path, random_tiny_model):
    from medusa_ray import evaluate

    heads_dir = _export_like(tmp_path / "heads", random_tiny_model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": CONV}) + "\n")
    cfg = build_config({"model": str(random_tiny_model), "eval": {"prompts": str(prompts)}})
    with pytest.raises(UserError, match="no config.json"):
        evaluate.run(cfg, draft_dir=str(tmp_path))
    with pytest.raises(UserError, match="num_speculative_tokens=3 but .* drafts at most 2"):
        evaluate.run(build_config({"model": str(random_tiny_model), "eval": {"prompts": str(prompts),
                                                                             "num_speculative_tokens": 3}}),
                     draft_dir=str(heads_dir))
    with pytest.raises(UserError, match="eval.prompts is not set"):
        evaluate.run(build_config({"model": str(random_tiny_model)}), draft_dir=str(heads_dir))


def test_head_accuracy_counts_assistant_targets(tmp_path, random_tiny_model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medusa_ray.model.accuracy import head_accuracy, load_exported_heads
    from medusa_ray.data.chat import IGNORE_INDEX, load_tokenizer, tokenize_messages

    heads_dir = _export_like(tmp_path / "heads", random_tiny_model)
    data = tmp_path / "heldout"
    data.mkdir()
    rows = [{"messages": CONV, "mode": "chat"}, {"messages": CONV[1:3], "mode": "chat"}]
    pq.write_table(pa.Table.from_pylist(rows), data / "shard.parquet")

    accuracy, positions = head_accuracy(str(random_tiny_model), heads_dir, str(data), topk=3, max_rows=10)
    assert set(accuracy) == {"head 0", "head 1"}
    for accs in accuracy.values():
        assert len(accs) == 3 and all(0.0 <= a <= 1.0 for a in accs) and accs == sorted(accs)
    # Head 0 is scored on every assistant token that has two tokens before it.
    tok = load_tokenizer(str(random_tiny_model))
    expected = sum(sum(1 for t, label in enumerate(tokenize_messages(tok, r["messages"], "chat", 512).labels)
                       if t >= 2 and label != IGNORE_INDEX) for r in rows)
    assert positions == expected > 0

    # The loaded heads are the saved ones: untrained blocks are the identity, so each head is the base lm_head.
    from safetensors.torch import load_file

    heads = load_exported_heads(heads_dir)
    lm_head = load_file(str(random_tiny_model / "model.safetensors"))["lm_head.weight"]
    x = torch.randn(4, heads.hidden_size)
    for k in range(heads.num_heads):
        torch.testing.assert_close(heads.project(k, heads.hidden(k, x)), x @ lm_head.T)


def test_plot_writes_png(tmp_path):
    from medusa_ray.evaluate.plot import plot_results

    results = {"accepted_per_position": [0.6, 0.3, 0.1], "acceptance_length": 2.0, "speedup": 1.4}
    path = plot_results(results, tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results["head_accuracy"] = {"head 0": [0.5, 0.6, 0.7], "head 1": [0.2, 0.3, 0.35]}
    path = plot_results(results, tmp_path / "b" / "b.png")
    assert path.stat().st_size > (tmp_path / "a.png").stat().st_size
