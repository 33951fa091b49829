"""export: checkpoints written by ``train.run`` become a directory vLLM loads (and TGI's rules accept).

Session fixtures train the heads once per (ZeRO stage, workers) and every test reuses them. The reference
weights for the consolidation test are gathered independently of export: fresh DeepSpeed engines with the
checkpoint's world size load it and gather each parameter (``GatheredParameters`` under ZeRO-3).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import free_port

from medusa_ray.config import build_config
from medusa_ray.errors import UserError
from medusa_ray.export.public import source_id

# (zero stage, workers, share_lm_head, steps). The ZeRO-2 single-worker run trains long enough for the heads
# to be clearly better than untrained ones in vLLM; the others only need a few real optimizer steps.
RUNS = {
    "z2w1": (2, 1, False, 40),
    "z3w1": (3, 1, False, 3),
    "z2w2": (2, 2, False, 3),
    "z3w2": (3, 2, True, 3),
}

pytestmark = pytest.mark.slow  # every test reads heads trained on Ray

# The conversations the tiny model learned, labelled with it (conftest's ``distilled``).
DISTILLED = {"model": "tiny_model", "seed": 11, "shards": 1, "ids": "conv-{i}", "errors": False}


def _cfg(tiny_model: Path, root: Path, **sections):
    tree = {"model": str(tiny_model), "ray": {"num_cpus": 8, "object_store_gb": 1.0},
            "train": {"storage_path": str(root / "ray_results"), "tracking": [], "max_length": 96,
                      "batch_size": 8, "lr": 5e-3, "warmup_steps": 2, "checkpoint_every": 1000,
                      "medusa_num_heads": 3}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values) if isinstance(values, dict) else tree.update({section: values})
    return build_config(tree)


@pytest.fixture(scope="module")
def trained(tiny_model, distilled, ray_session, tmp_path_factory) -> dict:
    """name -> (config, TrainResult) for every entry of RUNS, each trained once by ``train.run``."""
    from medusa_ray import train

    root = tmp_path_factory.mktemp("train")
    results = {}
    for name, (stage, workers, share, steps) in RUNS.items():
        cfg = _cfg(tiny_model, root, train={"data": str(distilled), "run_name": name, "zero_stage": stage,
                                            "num_workers": workers, "share_lm_head": share, "max_steps": steps})
        results[name] = (cfg, train.run(cfg))
    return results


def _gather_worker(rank: int, world: int, port: int, jobs: list[tuple[str, str]], out_dir: str) -> None:
    """Load each checkpoint into a fresh DeepSpeed engine of the same world size; rank 0 saves full weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    from medusa_ray.model.heads import MedusaHeads

    deepspeed.init_distributed(dist_backend="gloo")
    for name, ckpt in jobs:
        meta = json.loads((Path(ckpt) / "draft_meta.json").read_text())
        heads = MedusaHeads(meta["medusa_num_heads"], meta["medusa_num_layers"],
                            torch.zeros(meta["vocab_size"], meta["hidden_size"]), meta["share_lm_head"])
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": meta["zero_stage"]},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=heads, model_parameters=list(heads.parameters()), config=config)
        engine.load_checkpoint(str(Path(ckpt) / "deepspeed"), tag=f"global_step{meta['global_step']}",
                               load_optimizer_states=True, load_lr_scheduler_states=False)
        full = {}
        for param_name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=meta["zero_stage"] == 3):
                full[param_name] = p.detach().clone().float()
        if rank == 0:
            torch.save(full, Path(out_dir) / f"{name}.pt")
        engine.destroy()


@pytest.fixture(scope="module")
def gathered(trained, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """name -> the heads' full weights at the checkpoint's step, gathered by DeepSpeed itself."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("gathered")
    by_world: dict[int, list] = {}
    for name, (_, result) in trained.items():
        by_world.setdefault(RUNS[name][1], []).append((name, str(result.checkpoint)))
    for world, jobs in by_world.items():
        mp.start_processes(_gather_worker, args=(world, free_port(), jobs, str(out)), nprocs=world,
                           start_method="spawn", join=True)
    return {name: torch.load(out / f"{name}.pt") for name in trained}


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[str, Path]:
    from medusa_ray import export

    root = tmp_path_factory.mktemp("export")
    dirs = {}
    for name, (cfg, result) in trained.items():
        cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"output_dir": str(root / name)})})
        dirs[name] = export.run(cfg, checkpoint=str(result.checkpoint)).path
    return dirs


@pytest.mark.parametrize("name", list(RUNS))
def test_consolidation_is_exact(name, exported, gathered, trained, tiny_model):
    from safetensors.torch import load_file

    stage, workers, share, _ = RUNS[name]
    tensors = load_file(str(exported[name] / "medusa_lm_head.safetensors"))
    reference = gathered[name]
    layers = trained[name][0].train.medusa_num_layers
    lm_head = load_file(str(tiny_model / "model.safetensors"))["lm_head.weight"]
    for key, value in reference.items():
        assert torch.equal(tensors[key], value), f"{name}: {key} differs from the gathered weights"
    # Training moved the zero-initialised blocks, so equality above is not zeros == zeros.
    assert any(tensors[f"{k}.0.linear.weight"].abs().sum() > 0 for k in range(3))
    if share:
        # share_lm_head: the only projection is the frozen base lm_head, written once per head.
        assert set(tensors) == set(reference) | {f"{k}.{layers}.weight" for k in range(3)}
        for k in range(3):
            assert torch.equal(tensors[f"{k}.{layers}.weight"], lm_head)
    else:
        assert set(tensors) == set(reference)


def test_layout_follows_tgi_rules(exported):
    """TGI's Medusa loader (text_generation_server: models/__init__.py get_model, layers/speculative.py,
    layers/medusa.py), stated as rules:
    1. ``config.json`` with ``medusa_num_heads`` marks a Medusa dir; the base comes from
       ``base_model_name_or_path``; ``medusa_num_layers`` sizes each head.
    2. ``config.json`` must NOT have ``architectures``: SpeculativeHead.load reads ``architectures[0]`` and
       builds Medusa only on KeyError (otherwise the speculator is silently None).
    3. Weights live in ``medusa_lm_head.safetensors``; head i, block j is ``{i}.{j}.linear.weight`` [H, H]
       + ``{i}.{j}.linear.bias`` [H] (ResBlock, bias=True), the projection ``{i}.{L}.weight`` [V, H], no bias.
    """
    from safetensors import safe_open

    for name, out in exported.items():
        config = json.loads((out / "config.json").read_text())
        assert isinstance(config["medusa_num_heads"], int) and isinstance(config["medusa_num_layers"], int)
        # A local base is named redacted (no home directory in a published file); its path stays beside, unpublished.
        from medusa_ray.export import local_base

        assert Path(local_base(out)).is_dir() and config["base_model_name_or_path"] == "models0/tiny"
        assert "architectures" not in config
        # and what vLLM needs besides: its MedusaConfig, biases loaded, sizes.
        assert config["model_type"] == "medusa" and config["medusa_fc_bias"] is True
        assert config["version"] == "2"
        h, v, n, L = config["hidden_size"], config["vocab_size"], config["medusa_num_heads"], \
            config["medusa_num_layers"]
        expected = {}
        for i in range(n):
            for j in range(L):
                expected[f"{i}.{j}.linear.weight"] = [h, h]
                expected[f"{i}.{j}.linear.bias"] = [h]
            expected[f"{i}.{L}.weight"] = [v, h]
        with safe_open(str(out / "medusa_lm_head.safetensors"), framework="pt") as f:
            assert {k: list(f.get_slice(k).get_shape()) for k in f.keys()} == expected, name
        assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
        card = (out / "README.md").read_text()
        assert "speculative_config" in card and "text-generation-inference" in card


def test_model_card_describes_the_run(exported, trained):
    cfg, result = trained["z2w1"]
    card = (exported["z2w1"] / "README.md").read_text()
    assert f"| optimizer steps | {result.global_step} |" in card
    meta = json.loads((Path(result.checkpoint) / "draft_meta.json").read_text())
    assert f"| rows | {meta['data']['rows']} |" in card and f"| tokens | {meta['data']['tokens']} |" in card
    # The data's location is published without its directories (no home dir in a public card).
    assert f"| source | `{Path(meta['data']['source']).parent.name}/{Path(meta['data']['source']).name}` |" in card
    assert "| 0 | token t+2 |" in card and "| 2 | token t+4 |" in card  # per-head final metrics
    assert '"method": "medusa"' in card
    share_card = (exported["z3w2"] / "README.md").read_text()
    assert "share_lm_head" in share_card and "copy" in share_card


def test_default_checkpoint_is_the_run_s_best(trained, tmp_path):
    # One checkpoint per run here (checkpoint_every=1000): the best is the final one. Which of several is the
    # best is tested in test_train.py.
    from medusa_ray import export

    cfg, result = trained["z3w1"]
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"output_dir": str(tmp_path / "out")})})
    out = export.run(cfg).path
    marker = json.loads((out / "medusa_ray_export.json").read_text())
    assert marker["source"]["id"] == source_id(str(Path(result.checkpoint).resolve()))
    assert marker["source"]["checkpoint"] == "/".join(Path(result.checkpoint).parts[-2:])
    assert marker["source"]["global_step"] == result.global_step


def test_refuses_what_it_should(trained, exported, tmp_path, random_tiny_model):
    from medusa_ray import export

    cfg, result = trained["z3w1"]

    def with_output(out: Path, overwrite: bool = False):
        return cfg.model_copy(update={"export": cfg.export.model_copy(update={"output_dir": str(out),
                                                                               "overwrite": overwrite})})

    # Not one of ours.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "draft_meta.json").write_text(json.dumps({"format": "something-else/2"}))
    with pytest.raises(UserError, match="not a medusa-ray checkpoint"):
        export.run(with_output(tmp_path / "a"), checkpoint=str(foreign))
    with pytest.raises(UserError, match="no draft_meta.json"):
        export.run(with_output(tmp_path / "a"), checkpoint=str(tmp_path))

    # Heads whose hidden size does not fit the base model.
    wrong = tmp_path / "wrong-base"
    shutil.copytree(result.checkpoint, wrong)
    narrow = tmp_path / "narrow-base"
    narrow.mkdir()
    base_cfg = json.loads((random_tiny_model / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**base_cfg, "hidden_size": 64, "num_attention_heads": 1,
                                                   "num_key_value_heads": 1}))
    meta = json.loads((wrong / "draft_meta.json").read_text())
    (wrong / "draft_meta.json").write_text(json.dumps({**meta, "base_model": str(narrow)}))
    with pytest.raises(UserError, match="hidden_size=128 but base model .* hidden_size=64"):
        export.run(with_output(tmp_path / "b"), checkpoint=str(wrong))
    assert not (tmp_path / "b").exists()

    # Head count in the meta that the weights do not have.
    (wrong / "draft_meta.json").write_text(json.dumps({**meta, "medusa_num_heads": 5}))
    with pytest.raises(UserError, match="do not match the checkpoint meta \\(5 heads"):
        export.run(with_output(tmp_path / "b"), checkpoint=str(wrong))

    # An output dir holding a different export, unless --overwrite.
    other = tmp_path / "other"
    shutil.copytree(exported["z2w2"], other)
    with pytest.raises(UserError, match="already holds a different export"):
        export.run(with_output(other), checkpoint=str(result.checkpoint))
    assert json.loads((other / "medusa_ray_export.json").read_text())["source"]["id"] != \
        source_id(str(Path(result.checkpoint).resolve()))
    export.run(with_output(other, overwrite=True), checkpoint=str(result.checkpoint))
    assert json.loads((other / "medusa_ray_export.json").read_text())["source"]["id"] == \
        source_id(str(Path(result.checkpoint).resolve()))
    # ...and the same export again is a no-op.
    before = (other / "medusa_lm_head.safetensors").stat().st_mtime_ns
    export.run(with_output(other), checkpoint=str(result.checkpoint))
    assert (other / "medusa_lm_head.safetensors").stat().st_mtime_ns == before

    # A directory we did not write is never replaced, not even with --overwrite.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no medusa-ray export"):
        export.run(with_output(precious, overwrite=True), checkpoint=str(result.checkpoint))
    assert (precious / "notes.txt").read_text() == "keep me"


SECRET = "s3cr3t-T0KEN"


def test_nothing_private_is_published(trained, tmp_path):
    """A run whose config holds credentials in URLs and private paths: no file of its export repeats them."""
    from medusa_ray import evaluate, export

    cfg, result = trained["z2w1"]
    ckpt = tmp_path / "home" / "alice" / "runs" / "ckpt"
    shutil.copytree(result.checkpoint, ckpt)
    meta = json.loads((ckpt / "draft_meta.json").read_text())
    meta["config"]["distill"]["endpoint"] = f"http://user:{SECRET}@vllm.internal:8000/v1"
    meta["config"]["train"]["mlflow_tracking_uri"] = f"https://admin:{SECRET}@mlflow.example.com"
    meta["config"]["train"]["storage_path"] = f"s3://bucket-{SECRET}/ray_results?token={SECRET}"
    meta["config"]["distill"]["input"] = f"/home/alice/{SECRET}/prompts.jsonl"
    meta["data"]["source"] = f"s3://key:{SECRET}@bucket/distilled?sig={SECRET}"
    (ckpt / "draft_meta.json").write_text(json.dumps(meta))

    out = tmp_path / "out"
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"output_dir": str(out)})})
    export.run(cfg, checkpoint=str(ckpt))
    # Eval's results land in the export too; their output texts quote the prompts.
    evaluate._save({"acceptance_length": 1.5, "errors": [{"prompt": SECRET}], "medusa_dir": str(out),
                    "plot": f"/home/alice/{SECRET}.png"}, out, str(tmp_path / "private" / "eval.json"))

    leaked = [p.name for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    card = (out / "README.md").read_text()
    # A bucket's name is private too: the source is published as its scheme and a stable id.
    assert "| source | `s3:redacted-" in card and "bucket" not in card and "alice" not in card
    assert json.loads((out / "eval_results.json").read_text())["acceptance_length"] == 1.5
    assert SECRET in (tmp_path / "private" / "eval.json").read_text()  # the user's own copy is complete


class _PlantedCode:
    """Unpickling this writes a file: what anyone able to write a checkpoint could make a loader run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.write_text, (self.path, "planted code ran")


def test_export_never_unpickles_the_checkpoint(trained, exported, tmp_path):
    from safetensors.torch import load_file

    from medusa_ray import export

    cfg, result = trained["z2w1"]
    planted = tmp_path / "planted"
    shutil.copytree(result.checkpoint, planted)
    ran = tmp_path / "ran"
    pickles = list((planted / "deepspeed").rglob("*.pt"))
    assert pickles, "the checkpoint should hold DeepSpeed's .pt files"
    for f in pickles:
        torch.save(_PlantedCode(ran), f)

    def to(out: Path):
        return cfg.model_copy(update={"export": cfg.export.model_copy(update={"output_dir": str(out)})})

    out = export.run(to(tmp_path / "out"), checkpoint=str(planted)).path
    assert not ran.exists()
    weights = load_file(str(out / "medusa_lm_head.safetensors"))
    reference = load_file(str(exported["z2w1"] / "medusa_lm_head.safetensors"))
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)

    (planted / "draft.safetensors").unlink()
    with pytest.raises(UserError, match="no draft.safetensors"):
        export.run(to(tmp_path / "none"), checkpoint=str(planted))
    assert not ran.exists() and not (tmp_path / "none").exists()


def test_push_to_hub_uploads_every_file(exported, trained, tmp_path, monkeypatch, capsys, caplog, tiny_model):
    import huggingface_hub.constants

    from hub_standin import HubStandIn
    from medusa_ray import export

    token = "hf_standin_secret_token_123"
    cfg, result = trained["z2w1"]
    out = tmp_path / "push"
    with HubStandIn(token=token, writable_orgs={"medusa-org"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        export_cfg = cfg.export.model_copy(update={"output_dir": str(out), "push_to_hub": "medusa-org/tiny-medusa",
                                                   "private": True})
        export.run(cfg.model_copy(update={"export": export_cfg}), checkpoint=str(result.checkpoint))

        repo = hub.repos["medusa-org/tiny-medusa"]
        assert repo.private
        local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        # Every file, byte for byte, but this machine's paths (the local base's), which stay here.
        assert export.LOCAL_FILE in local and str(tiny_model).encode() in local.pop(export.LOCAL_FILE)
        assert repo.files == local
        assert "medusa-org/tiny-medusa" in local["README.md"].decode()  # serve commands name the Hub repo

        # Every refusal comes before the export is touched: one clear line, every file as it was.
        def files() -> dict[str, bytes]:
            return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

        before = files()
        denied = cfg.export.model_copy(update={"output_dir": str(out), "push_to_hub": "someone-else/heads"})
        with pytest.raises(UserError, match="cannot push to someone-else/heads: "):
            export.run(cfg.model_copy(update={"export": denied}), checkpoint=str(result.checkpoint))
        assert files() == before

        hub.token_role = "read"
        with pytest.raises(UserError, match="token is read-only"):
            export.run(cfg.model_copy(update={"export": export_cfg}), checkpoint=str(result.checkpoint))
        assert files() == before
        hub.token_role = "write"

        # An upload that fails halfway (the Hub or the network): the local card and marker are put back.
        elsewhere = cfg.export.model_copy(update={"output_dir": str(out), "push_to_hub": "medusa-org/other"})
        real_upload = export.upload

        def failing_upload(target, folder):
            assert "medusa-org/other" in (folder / "README.md").read_text()  # the card was rewritten for it
            raise UserError("push to medusa-org/other failed: 503 Service Unavailable")

        monkeypatch.setattr(export, "upload", failing_upload)
        with pytest.raises(UserError, match="503 Service Unavailable; the export in .* is unchanged"):
            export.run(cfg.model_copy(update={"export": elsewhere}), checkpoint=str(result.checkpoint))
        assert files() == before
        monkeypatch.setattr(export, "upload", real_upload)

        # No token at all.
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        with pytest.raises(UserError, match="no Hugging Face token"):
            export.run(cfg.model_copy(update={"export": export_cfg}), checkpoint=str(result.checkpoint))
        assert files() == before

    captured = capsys.readouterr()
    assert token not in captured.out + captured.err + caplog.text
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes()


def test_vllm_loads_export_and_trained_heads_beat_untrained(exported, trained, distilled, tiny_model, tmp_path):
    """The real load: greedy outputs unchanged, acceptance counted, and better than untrained heads."""
    from safetensors.torch import load_file, save_file

    from medusa_ray import evaluate
    from medusa_ray.evaluate import _engine_kwargs, _run_engine
    from medusa_ray.data import read_prompts
    from medusa_ray.model.heads import MedusaHeads
    from medusa_ray.tiny import corpus

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in corpus.conversations(8, seed=99)))
    cfg, _ = trained["z2w1"]
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={
        "prompts": str(prompts_file), "num_prompts": 8, "max_tokens": 40, "heldout": str(distilled),
        "output_json": str(tmp_path / "eval.json"), "plot": str(tmp_path / "eval.png"),
        "engine_kwargs": {"max_model_len": 256}})})
    trained_dir = exported["z2w1"]
    results = evaluate.run(cfg, draft_dir=str(trained_dir))

    assert results["outputs_identical"], results["errors"]
    assert results["num_drafts"] > 0 and results["num_accepted_tokens"] > 0
    assert len(results["accepted_per_position"]) == 3
    assert json.loads((tmp_path / "eval.json").read_text())["acceptance_length"] == results["acceptance_length"]
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The export remembers its evaluation and its card shows it.
    assert json.loads((trained_dir / "eval_results.json").read_text())["num_drafts"] == results["num_drafts"]
    assert "## Acceptance" in (trained_dir / "README.md").read_text()
    # Per-head accuracy: the first head (t+2) is the easiest, and all are real probabilities.
    acc = results["head_accuracy"]
    assert set(acc) == {"head 0", "head 1", "head 2"}
    assert all(0.0 <= a <= 1.0 for accs in acc.values() for a in accs)
    assert all(accs == sorted(accs) for accs in acc.values())  # top-k accuracy grows with k

    # Untrained heads (what MedusaHeads starts from) in the same layout, on the same prompts.
    untrained_dir = tmp_path / "untrained"
    shutil.copytree(trained_dir, untrained_dir)
    lm_head = load_file(str(tiny_model / "model.safetensors"))["lm_head.weight"]
    fresh = MedusaHeads(3, 1, lm_head)
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()},
              str(untrained_dir / "medusa_lm_head.safetensors"))
    prompts = read_prompts(str(prompts_file), 8)
    spec = {"method": "medusa", "model": str(untrained_dir), "num_speculative_tokens": 3}
    _, _, counters = _run_engine(str(tiny_model), prompts, 40, _engine_kwargs(cfg) | {"max_model_len": 256}, spec)
    untrained_len = 1 + counters["vllm:spec_decode_num_accepted_tokens"] / counters["vllm:spec_decode_num_drafts"]
    print(f"acceptance length: trained {results['acceptance_length']:.3f}, untrained {untrained_len:.3f}")
    assert results["acceptance_length"] > untrained_len
