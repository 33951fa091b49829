"""The preflight's memory estimates and refusals, from a config.json alone (no weights, no Ray)."""

from __future__ import annotations

import pytest
from helpers import LLAMA_70B_CONFIG, write_model_config

from medusa_ray import preflight
from medusa_ray.config import build_config
from medusa_ray.errors import UserError

LLAMA_70B = LLAMA_70B_CONFIG
SMALL = {**LLAMA_70B, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 512, "vocab_size": 1024, "max_position_embeddings": 2048}


def _model(tmp_path, config: dict, name: str) -> str:
    return write_model_config(tmp_path / name, config)


@pytest.fixture
def llama70b(tmp_path):
    return _model(tmp_path, LLAMA_70B, "llama-70b")


def _cfg(model: str, *overrides: str):
    return build_config({}, [f"model={model}", *overrides])


def test_parameter_count_of_a_70b_from_its_config(llama70b, monkeypatch):
    shape = preflight.model_shape(llama70b)
    assert shape.params == pytest.approx(70.55e9, rel=0.01)
    assert shape.largest == 128256 * 8192  # the embeddings (and the untied lm_head)
    # A config transformers cannot build is counted by formula, to the same number for a plain Llama.
    import transformers

    def refuse(*args, **kwargs):
        raise ValueError("unknown architecture")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", refuse)
    preflight.model_shape.cache_clear()
    try:
        formula = preflight.model_shape(llama70b)
    finally:
        preflight.model_shape.cache_clear()
    assert formula.params == pytest.approx(shape.params, rel=0.01) and formula.largest == shape.largest


def test_an_unreadable_config_is_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read the config") as err:
        preflight.model_shape(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)


def test_estimate_parts_and_line(llama70b):
    cfg = _cfg(llama70b, "train.num_workers=4", "train.zero_stage=3")
    replicated = preflight.train_estimate(cfg, on_gpu=True, shard_base=False)
    sharded = preflight.train_estimate(cfg, on_gpu=True, shard_base=True)
    assert replicated.base == pytest.approx(70.55e9 * 2 / 2**30, rel=0.01)  # bf16 on GPU
    assert sharded.base == pytest.approx(replicated.base / 4 + 128256 * 8192 * 2 / 2**30, rel=1e-6)
    # Medusa's 3 heads each with a 128k x 8k lm_head copy: 3.35e9 parameters, a quarter of them per worker.
    assert sharded.drafter == pytest.approx(3 * (8192**2 + 8192 + 128256 * 8192) * 2 / 4 / 2**30, rel=1e-6)
    assert sharded.total == pytest.approx(sharded.base + sharded.drafter + sharded.optimizer + sharded.activations)
    line = sharded.line()
    assert line.startswith(f"per worker ≈ {sharded.total:.1f} GiB: base {sharded.base:.1f} (sharded 1/4), drafter")
    assert "optimizer" in line and "activations" in line and "\n" not in line
    # On CPU the base is fp32; sharing the lm_head shrinks the drafter to the heads' blocks.
    assert preflight.train_estimate(cfg, on_gpu=False, shard_base=False).base == pytest.approx(2 * replicated.base)
    shared = preflight.train_estimate(_cfg(llama70b, "train.share_lm_head=true"), True, False)
    assert shared.drafter < 0.1 * preflight.train_estimate(_cfg(llama70b), True, False).drafter


def test_a_method_list_is_sized_by_its_largest_drafter(llama70b):
    medusa = preflight.train_estimate(_cfg(llama70b), True, False)
    eagle3 = preflight.train_estimate(_cfg(llama70b, "train.method=eagle3"), True, False)
    both = preflight.train_estimate(_cfg(llama70b, "train.method=[medusa, eagle3]"), True, False)
    assert both.total == pytest.approx(max(medusa.total, eagle3.total))
    assert eagle3.drafter > 0 and eagle3.activations > medusa.activations  # three steps of a decoder layer


def test_refuses_too_few_workers_in_one_line_and_names_the_fix(llama70b):
    cfg = _cfg(llama70b, "train.num_workers=2", "train.zero_stage=3")
    with pytest.raises(UserError) as err:
        preflight.check_train(cfg, on_gpu=True, worker_memory_gib=80)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train: needs ≈ ")
    assert "a worker has 80 GiB" in message and "131.4 GiB" in message  # the whole base, bf16
    assert "use train.num_workers=3 with train.shard_base=true (you asked for 2)" in message
    # The count it names is enough, with shard_base auto: the base is sharded.
    assert preflight.check_train(_cfg(llama70b, "train.num_workers=3", "train.zero_stage=3"), True, 80) is True
    assert preflight.check_train(_cfg(llama70b, "train.num_workers=8", "train.zero_stage=3"), True, 80) is True


def test_shard_base_settings_are_honoured(llama70b, tmp_path):
    four = ["train.num_workers=4", "train.zero_stage=3"]
    with pytest.raises(UserError, match=r"use train\.shard_base=true \(you asked for 4 workers, replicated\)"):
        preflight.check_train(_cfg(llama70b, *four, "train.shard_base=false"), True, 80)
    assert preflight.check_train(_cfg(llama70b, *four, "train.shard_base=true"), True, 80) is True
    # Nothing fits one worker of 1 GiB even at the largest count it would suggest.
    with pytest.raises(UserError, match="even train.num_workers=1024"):
        preflight.check_train(_cfg(llama70b, *four), True, 1)
    small = _model(tmp_path, SMALL, "small")
    assert preflight.check_train(_cfg(small, *four), True, 80) is False  # replicated: it fits
    assert preflight.check_train(_cfg(small, *four, "train.shard_base=true"), True, 80) is True
    assert preflight.check_train(_cfg(small, "train.shard_base=true"), True, 80) is True  # honoured for one worker
    # Unknown memory refuses nothing: auto means replicated.
    assert preflight.check_train(_cfg(llama70b, "train.num_workers=2"), True, None) is False
    assert preflight.check_train(_cfg(llama70b, "train.shard_base=true"), True, None) is True


def test_the_tiny_model_trains_replicated(tmp_path):
    from medusa_ray.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny", pretrain_steps=0)
    cfg = _cfg(str(model), "train.num_workers=2")
    assert preflight.check_train(cfg, on_gpu=False, worker_memory_gib=4) is False
    assert preflight.train_estimate(cfg, False, False).total < 1


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    """Every test here sees no cluster unless it fakes one: in the full suite a slow test's session cluster (no
    GPUs) is still up, and the engine check would ask it."""
    monkeypatch.setattr(preflight, "_ray_up", lambda: False)


def _fake_ray(monkeypatch, nodes, node_types=None):
    monkeypatch.setattr(preflight, "_ray_up", lambda: True)
    monkeypatch.setattr(preflight, "_alive_nodes", lambda: [{"Alive": True, "Resources": r} for r in nodes])
    monkeypatch.setattr("medusa_ray.cluster.autoscaler_node_types", lambda: node_types)


def test_worker_memory(monkeypatch, llama70b):
    assert preflight.worker_memory_gib(_cfg(llama70b, "train.worker_memory_gb=40"), True) == 40
    assert preflight.worker_memory_gib(_cfg(llama70b), True) is None  # no Ray
    head = {"CPU": 0, "memory": 8 * 2**30}
    _fake_ray(monkeypatch, [head, {"CPU": 16, "memory": 64 * 2**30}, {"CPU": 16, "memory": 48 * 2**30}])
    # 3 workers over 2 CPU nodes: 2 land on one; the smaller node's RAM is split between them.
    assert preflight.worker_memory_gib(_cfg(llama70b, "train.num_workers=3"), False) == pytest.approx(24)
    assert preflight.worker_memory_gib(_cfg(llama70b), True) is None  # no GPU node
    gpu = {"CPU": 64, "GPU": 8, "memory": 900 * 2**30, "accelerator_type:H100": 1}
    _fake_ray(monkeypatch, [head, gpu], node_types=[{"CPU": 32, "GPU": 4, "accelerator_type:L4": 1}])
    assert preflight.worker_memory_gib(_cfg(llama70b), True) == 24  # the smallest GPU it may get
    _fake_ray(monkeypatch, [head, gpu, {"CPU": 8, "GPU": 1, "accelerator_type:XPU-9": 1}])
    assert preflight.worker_memory_gib(_cfg(llama70b), True) is None  # a GPU of unknown size


def test_engine_gets_the_tensor_parallelism_that_fits(llama70b, capsys):
    cfg = _cfg(llama70b)
    kwargs = preflight.check_engine(cfg, "distill", {"max_model_len": 8192}, 80)
    assert kwargs == {"max_model_len": 8192, "tensor_parallel_size": 4}
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "tensor_parallel_size=4" in said[0]
    with pytest.raises(UserError) as err:
        preflight.check_engine(cfg, "eval", {"tensor_parallel_size": 2}, 80)
    assert "\n" not in str(err.value) and "set eval.engine_kwargs.tensor_parallel_size=4" in str(err.value)
    assert preflight.check_engine(cfg, "eval", {"tensor_parallel_size": 8}, 80) == {"tensor_parallel_size": 8}
    # H200s hold it on two; on CPU (no GPU memory) nothing is checked.
    assert preflight.check_engine(cfg, "eval", {"max_model_len": 8192}, 141)["tensor_parallel_size"] == 2
    assert preflight.check_engine(cfg, "distill", {}, None) == {}
    small = preflight.check_engine(cfg.model_copy(update={"model": llama70b}), "eval", {"max_model_len": 8192}, 1000)
    assert "tensor_parallel_size" not in small
    with pytest.raises(UserError, match="pipeline_parallel_size"):
        preflight.check_engine(cfg, "distill", {}, 16)  # 16 GB GPUs: even 8 of them are too small


def test_engine_refuses_when_no_node_has_the_gpus(llama70b, monkeypatch):
    cfg = _cfg(llama70b)
    _fake_ray(monkeypatch, [{"CPU": 0}, {"CPU": 32, "GPU": 2, "accelerator_type:H100": 1}], node_types=None)
    with pytest.raises(UserError) as err:
        preflight.check_engine(cfg, "eval", {"tensor_parallel_size": 4}, 80)
    assert "needs 4 GPUs on one node" in str(err.value) and "more than 2" in str(err.value)
    # prepare_engine reads the GPU's memory from the cluster: H100s, so TP 4, which no node holds.
    with pytest.raises(UserError, match="needs 4 GPUs on one node"):
        preflight.prepare_engine(cfg, "distill", {"max_model_len": 8192}, "gpu")
    assert preflight.prepare_engine(cfg, "distill", {}, "cpu") == {}
    # A node type the autoscaler can add counts.
    _fake_ray(monkeypatch, [{"CPU": 0}], node_types=[{"CPU": 96, "GPU": 8, "accelerator_type:H100": 1}])
    assert preflight.prepare_engine(cfg, "eval", {"max_model_len": 8192}, "gpu")["tensor_parallel_size"] == 4


def test_a_small_model_s_estimate_is_in_mib(random_tiny_model):
    line = preflight.train_estimate(_cfg(random_tiny_model), False, False).line()
    assert line.startswith("per worker ≈ ") and " MiB: base " in line and "base 0.0 " not in line
