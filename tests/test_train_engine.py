"""The worker's training step in-process (real DeepSpeed, one rank over gloo): frozen base, heads-only optimizer."""

import json
import os
import socket

import pytest
import torch

from medusa_ray.config import build_config
from medusa_ray.data.chat import load_tokenizer, tokenize_messages
from medusa_ray.drafters.medusa import Medusa, medusa_metrics
from medusa_ray.tiny import corpus
from medusa_ray.train import worker
from medusa_ray.train.data import collate


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_training_changes_only_the_heads(process_group, random_tiny_model):
    # Random base weights are enough here: the heads still learn the data's token statistics.
    tiny_model = random_tiny_model
    cfg = build_config({}, [f"model={tiny_model}", "train.zero_stage=2", "train.lr=3e-3", "train.warmup_steps=1",
                            "train.logits_chunk_tokens=64"])
    base = worker.load_base(cfg, torch.device("cpu"), torch.float32)
    heads = Medusa(cfg).build(base, torch.device("cpu"), torch.float32)
    assert all(not p.requires_grad for p in base.parameters())
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    heads_before = {k: v.clone() for k, v in heads.state_dict().items()}
    engine = worker.init_engine(heads, worker.deepspeed_config(cfg, on_gpu=False), warmup_steps=1, total_steps=8)

    # The optimizer holds exactly the heads' parameters: none of the base model's.
    in_optimizer = {id(p) for group in engine.optimizer.bit16_groups for p in group}
    assert in_optimizer == {id(p) for p in heads.parameters()}
    assert not in_optimizer & {id(p) for p in base.parameters()}

    tok = load_tokenizer(str(tiny_model))
    examples = [tokenize_messages(tok, c, "chat", 256) for c in corpus.conversations(8, seed=11)]
    batch = collate([e.input_ids for e in examples], [e.labels for e in examples], tok.pad_token_id)
    decoder = worker.decoder_of(base)
    losses = []
    for _ in range(6):
        features = Medusa(cfg).features(decoder, batch[0], batch[1])
        stats, tokens, lr = worker.forward_backward(engine, features, batch, Medusa(cfg), torch.device("cpu"))
        losses.append(medusa_metrics(stats, 0.8, 3)["loss"])
        assert lr > 0 and tokens == int(batch[1].sum())
    assert losses[-1] < losses[0] * 0.9, losses

    # The base model is bit-identical, lm_head included; the heads moved.
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert any(not torch.equal(v, heads_before[k]) for k, v in heads.state_dict().items())


def test_lr_schedule_warms_up_then_decays():
    f = worker.lr_lambda(warmup_steps=4, total_steps=20)
    rates = [f(i) for i in range(20)]
    assert rates[0] > 0 and rates[3] == 1.0
    assert rates[:4] == sorted(rates[:4]) and rates[3:] == sorted(rates[3:], reverse=True)
    assert 0 < rates[-1] < 0.05


def test_the_loop_runs_without_ray_and_its_checkpoint_exports(process_group, random_tiny_model, tmp_path):
    """What benchmarks/gpu_smoke.py does on a GPU, here on CPU over gloo: run_loop with a LocalSession (no Ray),
    with validation, then export the best checkpoint it wrote."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medusa_ray import export
    from medusa_ray.train import plan_schedule
    from medusa_ray.train.plan import make_plan
    from medusa_ray.train.worker import LocalSession, run_loop

    rows = [{"id": f"c{i}", "messages": m, "mode": "chat"} for i, m in enumerate(corpus.conversations(40, seed=2))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "part-0.parquet")
    cfg = build_config({}, [f"model={random_tiny_model}", "train.zero_stage=2", "train.batch_size=4",
                            "train.max_steps=3", "train.val_every=2", "train.warmup_steps=0", "train.val_min_rows=4",
                            "train.max_length=128", "train.tracking=[]", f"export.output_dir={tmp_path / 'export'}"])
    plan = make_plan([str(tmp_path / "part-0.parquet")], 0, 0.1, 4, 100)
    assert (plan.train_rows, plan.val_rows) == (36, 4)

    class Recording(LocalSession):
        def report(self, metrics, checkpoint_dir, step):
            reports.append((step, checkpoint_dir is not None))
            super().report(metrics, checkpoint_dir, step)

    reports = []
    session = Recording(torch.device("cpu"), tmp_path / "checkpoints")
    result = run_loop(cfg, session, plan, plan_schedule(cfg.train, plan.train_rows), str(tmp_path / "run"))
    assert result["progress"]["step"] == 3 and result["progress"]["rows"] == 12
    # Ray Train takes one report per controller poll (2 s): a report every step would cap training at half a
    # step a second. Only checkpoints are reported; every step's metrics still go to metrics.jsonl.
    assert reports == [(2, True), (3, True)]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3]
    # Validated at step 2 and at the end; every checkpoint carries its validation.
    assert [p.name for p in session.checkpoints] == ["checkpoint_step00000002", "checkpoint_step00000003"]
    assert result["validation"]["step"] == 3 and result["validation"]["rows"] == 4
    assert 1.0 <= result["validation"]["expected_acceptance"] <= 4.0
    assert (tmp_path / "run" / "validation.jsonl").read_text().count("\n") == 2
    out = export.run(cfg, checkpoint=str(session.checkpoints[-1])).path
    assert (out / "medusa_lm_head.safetensors").stat().st_size > 0


def test_drafter_dtype_follows_the_deepspeed_config():
    """bf16 heads only where ZeRO keeps fp32 master weights; a user's DeepSpeed JSON decides for itself."""
    zero0 = worker.deepspeed_config(build_config({}, ["train.zero_stage=0"]), on_gpu=True)
    zero2 = worker.deepspeed_config(build_config({}, ["train.zero_stage=2"]), on_gpu=True)
    cpu = worker.deepspeed_config(build_config({}, ["train.zero_stage=2"]), on_gpu=False)
    assert worker.drafter_dtype(zero0) == torch.float32 and not zero0["bf16"]["enabled"]
    assert worker.drafter_dtype(zero2) == torch.bfloat16
    assert worker.drafter_dtype(cpu) == torch.float32
    assert worker.drafter_dtype({"fp16": {"enabled": True}}) == torch.float16


class _Planted:
    """Unpickling this writes the file named by MEDUSA_RAY_PWNED: proof that code ran."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MEDUSA_RAY_PWNED']}",))


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_resume_never_unpickles_code_planted_in_deepspeed_files(process_group, tmp_path, monkeypatch, zero_stage):
    """Whoever can write the run's storage must not run code on the workers at resume: DeepSpeed's files load
    with weights_only (its own plain types allow-listed), so a planted pickle is refused, not run."""
    from medusa_ray.model.heads import MedusaHeads

    marker = tmp_path / "pwned"
    monkeypatch.setenv("MEDUSA_RAY_PWNED", str(marker))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": zero_stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}

    def engine():
        return worker.init_engine(MedusaHeads(2, 1, torch.randn(50, 16)), config, 1, 4)

    trained = engine()
    loss, _ = trained(torch.randn(1, 4, 16), labels=torch.randint(0, 50, (1, 4)), head_decay=0.8, topk=1,
                      chunk_tokens=16)
    trained.backward(loss)
    trained.step()
    trained.save_checkpoint(str(tmp_path / "ds"), tag="t", client_state={"medusa_ray": {"step": 1}})
    _, client = engine().load_checkpoint(str(tmp_path / "ds"), tag="t")  # what DeepSpeed wrote loads as it is
    assert client["medusa_ray"] == {"step": 1}

    for path in (tmp_path / "ds" / "t").glob("*.pt"):
        state = torch.load(path, weights_only=False)  # the test's own file
        state["planted"] = _Planted()
        torch.save(state, path)
        with pytest.raises(Exception, match="Weights only load failed"):
            engine().load_checkpoint(str(tmp_path / "ds"), tag="t")
        assert not marker.exists()
