"""EAGLE-3 through the same pipeline: layers and vocabulary, packing, then train -> resume -> export -> vLLM eval on
the tiny model (real Ray Train, DeepSpeed ZeRO-2 over 2 gloo workers, the speculators library, vLLM CPU)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from medusa_ray.config import build_config
from medusa_ray.model.eagle3 import aux_layer_ids, pack, vocab_maps


def test_the_draft_reads_vllms_default_layers_or_a_spread_for_shallow_models():
    assert aux_layer_ids(32) == [2, 16, 29]  # vLLM's (2, n // 2, n - 3)
    assert aux_layer_ids(2) == [0, 1, 2]  # too shallow for it: embeddings, middle, last
    assert aux_layer_ids(4, [3, 0, 1]) == [0, 1, 3]
    with pytest.raises(ValueError, match="3 distinct layers"):
        aux_layer_ids(4, [0, 0, 1])


def test_draft_vocabulary_is_the_most_said_tokens_as_vllm_reads_the_maps():
    counts = Counter({5: 100, 9: 80, 2: 60, 7: 1})
    d2t, t2d = vocab_maps(counts, draft_vocab_size=3, vocab_size=12)
    targets = [i + int(d2t[i]) for i in range(3)]  # d2t holds offsets from draft id to target id
    assert sorted(targets) == [2, 5, 9] and t2d.dtype == torch.bool and t2d.shape == (12,)
    assert [i for i in range(12) if t2d[i]] == [2, 5, 9]
    assert vocab_maps(counts, draft_vocab_size=12, vocab_size=12) == (None, None)  # the whole vocabulary


def test_padded_batches_pack_into_one_shifted_row():
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 6, -100, -100]])
    aux, last = torch.randn(2, 4, 6), torch.randn(2, 4, 2)
    batch, positions = pack(ids, mask, labels, aux, last, -100, torch.float32)
    # Each conversation loses one position to the shift (slot t: token t+1, the base's state at t).
    assert batch["input_ids"].tolist() == [[2, 3, 4, 6]]
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1]]
    assert batch["loss_mask"].tolist() == [[False, True, True, True]] and positions == 3
    assert torch.equal(batch["hidden_states"][0, 3], aux[1, 0])
    assert batch["hidden_states"].shape == (1, 4, 6) and batch["verifier_last_hidden_states"].shape == (1, 4, 2)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def eagle3_run(tiny_model, ray_session, tmp_path_factory):
    from helpers import write_distilled

    from medusa_ray import train

    work = tmp_path_factory.mktemp("eagle3")
    data = write_distilled(work / "data", n=256, model=str(tiny_model))

    def cfg(*overrides):
        return build_config({}, [
            f"model={tiny_model}", f"train.data={data}", f"train.storage_path={work / 'runs'}", "train.run_name=e3",
            "train.method=eagle3", "train.eagle3_draft_vocab_size=256", "train.num_workers=2", "train.zero_stage=2",
            "train.batch_size=8", "train.lr=0.003", "train.warmup_steps=5", "train.checkpoint_every=20",
            "train.val_every=20", "train.tracking=[]", f"export.output_dir={work / 'export'}",
            "eval.engine_kwargs={dtype: float32, max_model_len: 512}", "eval.num_prompts=16", "eval.max_tokens=48",
            *overrides])

    return cfg, train.run(cfg("train.max_steps=40")), work


@pytest.mark.slow
def test_eagle3_trains_resumes_exports_and_beats_an_untrained_draft_in_vllm(eagle3_run, tiny_model):
    from medusa_ray import evaluate, export, train
    from medusa_ray.checkpoint import read_meta

    cfg, first, work = eagle3_run
    meta = read_meta(first.checkpoint).flat()
    assert first.global_step == 40 and meta["method"] == "eagle3" and meta["eagle3_draft_vocab_size"] == 256
    assert meta["eagle3_layer_ids"] == [0, 1, 2] and set(first.validation["names"]) == {
        "eagle3_step0", "eagle3_step1", "eagle3_step2"}
    assert 1.0 < first.validation["expected_acceptance"] < 4.0
    assert {Path(p).name for p in first.plots} == {"head_losses.png", "validation.png"}

    again = train.run(cfg("train.max_steps=50"))  # the same run, extended: it resumes from step 40
    assert again.resumed_from == 40 and again.global_step == 50

    out = export.run(cfg(), checkpoint=again.checkpoint).path
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["draft_vocab_size"] == 256
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    card = (out / "README.md").read_text()
    assert "EAGLE-3 draft" in card and '"method": "eagle3"' in card

    prompts = work / "prompts.jsonl"
    from medusa_ray.tiny import corpus

    prompts.write_text("".join(json.dumps({"messages": c[:1] if c[0]["role"] == "user" else c[:2]}) + "\n"
                               for c in corpus.conversations(16, seed=999)))
    results = evaluate.run(cfg(f"eval.prompts={prompts}"), draft_dir=str(out), compare_untrained=True)
    assert results["method"] == "eagle3" and results["num_drafts"] > 0
    assert results["outputs_identical"] is True  # speculation never changes greedy output
    untrained = results["compared"]["untrained"]
    assert untrained["outputs_identical"] is True
    assert results["acceptance_length"] > untrained["acceptance_length"] + 0.3, (results, untrained)
