"""Preflight: will the run fit? Memory estimates from the base model's ``config.json``, before anything starts.

No weights are read. The base is built on PyTorch's ``meta`` device (``AutoModelForCausalLM.from_config``), which
gives its exact parameter count and largest tensor in a fraction of a second; a config that transformers cannot
build falls back to a formula (embeddings, attention, MLP or experts, norms, lm_head unless tied).

Training (``train_estimate``, ``check_train``): one Ray Train worker holds

* **base**: the frozen base, bf16 on GPU and fp32 on CPU (as ``train/worker.py`` loads it); sharded, its share
  ``1/num_workers`` plus the largest single tensor, which ZeRO-3 gathers whole while it runs;
* **drafter**: its weights (``drafter_params``: Medusa's heads, or EAGLE-3's layer, fc, draft lm_head and frozen
  embeddings), fp32 on CPU and bf16 on GPU when ZeRO is on (stage 3 keeps a ``1/num_workers`` share);
* **optimizer**: AdamW's two fp32 states, plus an fp32 master copy when the weights are bf16 (divided among the
  workers from ZeRO stage 1), and the gradients (divided from stage 2);
* **activations**: ``batch_size x max_length`` tokens through the base under ``no_grad`` (about two decoder
  layers' intermediates live at once), the drafter's saved activations, and one chunk of logits with its
  gradient (``logits_chunk_tokens x vocab x 4 bytes x 2``).

It is an estimate (CUDA context, allocator fragmentation and NCCL buffers are not in it), so a worker is only
planned up to ``HEADROOM`` of its memory.

Engines (``check_engine``): vLLM holds the base's weights (bf16) split over ``tensor_parallel_size x
pipeline_parallel_size`` GPUs, inside ``gpu_memory_utilization`` (0.9) of each, and refuses to start unless the KV
cache holds at least one ``max_model_len`` sequence; activations and CUDA graphs take about a tenth of the GPU.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from medusa_ray.config import Config
from medusa_ray.errors import UserError

log = logging.getLogger(__name__)

GIB = 2**30
HEADROOM = 0.9
"""Share of a worker's memory the estimate may plan for: the rest is for what it does not count."""
MAX_WORKERS = 1024
"""The largest ``train.num_workers`` a refusal suggests."""
MAX_TP = 8
"""The largest ``tensor_parallel_size`` chosen automatically: the GPUs of one node."""
ENGINE_ACTIVATIONS = 0.1
"""Share of each GPU vLLM's activations, CUDA graphs and sampler need besides weights and KV cache."""

# Memory of a GPU by Ray's accelerator type (the ``accelerator_type:<X>`` resource a node advertises), in GiB as
# sold. Ray names a 40 GB and an 80 GB A100 alike ``A100`` unless it can tell them apart: ``A100`` is taken as
# 80 here (set ``train.worker_memory_gb`` on 40 GB cards); likewise ``V100`` as 16.
GPU_MEMORY_GIB = {
    "H100": 80, "H200": 141, "H20": 96, "B200": 180, "A100": 80, "A100-80G": 80, "A100-40G": 40, "L4": 24,
    "A10G": 24, "L40S": 48, "V100": 16, "T4": 16, "RTX-PRO-6000": 96,
}


# ---- the base model's shape --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    params: int
    """All parameters of the base (tied embeddings counted once)."""
    largest: int
    """Parameters of its largest single tensor."""
    layer: int
    """Parameters of one decoder layer (the first)."""
    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int
    quantized: bool


def _text_config(model: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - a missing dir, no network, a gated repo: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"preflight: cannot read the config of model {model}: {first}") from None
    return config, (config.get_text_config() if hasattr(config, "get_text_config") else config)


def _dims(text) -> dict[str, int]:
    hidden = int(text.hidden_size)
    heads = int(getattr(text, "num_attention_heads", 0) or 1)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
    intermediate = getattr(text, "moe_intermediate_size", None) if experts else None
    intermediate = intermediate or getattr(text, "intermediate_size", None) or 4 * hidden
    return {"hidden": hidden, "intermediate": int(intermediate), "vocab": int(text.vocab_size),
            "layers": int(text.num_hidden_layers), "heads": heads,
            "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads), "head_dim": int(head_dim),
            "max_positions": int(getattr(text, "max_position_embeddings", 0) or 0)}


def _formula(text, d: dict[str, int]) -> tuple[int, int, int]:
    """(params, largest tensor, one layer) from the config alone: a dense or MoE decoder of the usual shape."""
    h, i = d["hidden"], d["intermediate"]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    attention = h * q + 2 * h * kv + q * h
    experts = int(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0)
    mlp = 3 * h * i * max(experts, 1) + (h * experts if experts else 0)  # gate/up/down per expert, the router
    layer = attention + mlp + 2 * h
    embed = d["vocab"] * h
    tied = bool(getattr(text, "tie_word_embeddings", False))
    params = embed + d["layers"] * layer + h + (0 if tied else embed)
    return params, max(embed, 3 * h * i, h * q), layer


@lru_cache(maxsize=16)
def model_shape(model: str) -> ModelShape:
    """The base's parameter counts and dimensions, from its config alone (cached per model)."""
    config, text = _text_config(model)
    d = _dims(text)
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config)
        params = list(built.parameters())  # tied tensors once
        total, largest = sum(p.numel() for p in params), max(p.numel() for p in params)
        layers = getattr(built.get_decoder(), "layers", None) if hasattr(built, "get_decoder") else None
        layer = sum(p.numel() for p in layers[0].parameters()) if layers else _formula(text, d)[2]
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build still has a shape
        log.debug("preflight: counting %s by formula (%s)", model, exc)
        total, largest, layer = _formula(text, d)
    quantized = getattr(config, "quantization_config", None) is not None
    return ModelShape(params=int(total), largest=int(largest), layer=int(layer), quantized=quantized, **d)


# ---- training ---------------------------------------------------------------------------------------------

def drafter_params(method: str, train_cfg, shape: ModelShape) -> tuple[int, int]:
    """(trainable, frozen) parameters of a drafter for this base.

    * ``medusa``: ``medusa_num_heads x (medusa_num_layers x (H^2 + H) + V x H)``, without the ``V x H`` when
      ``share_lm_head`` (the heads project through the frozen base lm_head, already counted in the base).
    * ``eagle3``: one Llama decoder layer whose attention reads ``2H`` (embedding and hidden state), the ``3H ->
      H`` fc over the three base layers it reads, a ``draft_vocab x H`` lm_head and norms; frozen: the ``V x H``
      embeddings taken from the base.
    * any other drafter: counted as a Medusa head per draft position (a rough stand-in).
    """
    h, v = shape.hidden, shape.vocab
    if method == "eagle3":
        q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
        layer = 2 * h * q + 2 * (2 * h * kv) + q * h + 3 * h * shape.intermediate + 3 * h
        draft_vocab = min(int(getattr(train_cfg, "eagle3_draft_vocab_size", v)), v)
        return layer + 3 * h * h + draft_vocab * h + h, v * h
    heads = int(getattr(train_cfg, "medusa_num_heads", 0) or getattr(train_cfg, "eagle3_ttt_steps", 1))
    per_head = int(getattr(train_cfg, "medusa_num_layers", 1)) * (h * h + h)
    if not getattr(train_cfg, "share_lm_head", False):
        per_head += v * h
    return heads * per_head, 0


def _drafter_activation_elems(method: str, train_cfg, shape: ModelShape) -> int:
    """Elements per token the drafter keeps for its backward pass (and the base features it reads)."""
    h, i = shape.hidden, shape.intermediate
    if method == "eagle3":
        steps = int(getattr(train_cfg, "eagle3_ttt_steps", 1))
        return 3 * h + steps * (10 * h + 3 * i)
    heads = int(getattr(train_cfg, "medusa_num_heads", 1))
    return h + heads * int(getattr(train_cfg, "medusa_num_layers", 1)) * 3 * h


@dataclass
class TrainEstimate:
    """GiB one training worker needs, by part."""
    base: float
    drafter: float
    optimizer: float
    activations: float
    shard_base: bool
    num_workers: int
    replicated_base: float
    """The whole base in the worker's dtype (GiB), whatever ``shard_base`` says."""

    @property
    def total(self) -> float:
        return self.base + self.drafter + self.optimizer + self.activations

    def parts(self, scale: float = 1.0) -> str:
        """The parts in GiB (``scale`` 1024: in MiB)."""
        how = f"sharded 1/{self.num_workers}" if self.shard_base else "replicated"
        return (f"base {self.base * scale:.1f} ({how}), drafter {self.drafter * scale:.1f}, optimizer "
                f"{self.optimizer * scale:.1f}, activations {self.activations * scale:.1f}")

    def line(self) -> str:
        if self.total < 1:  # a small model: in MiB, where GiB would print zeros
            return f"per worker ≈ {self.total * 1024:.1f} MiB: {self.parts(1024)}"
        return f"per worker ≈ {self.total:.1f} GiB: {self.parts()}"


def train_estimate(cfg: Config, on_gpu: bool, shard_base: bool) -> TrainEstimate:
    """Memory of ONE training worker for ``cfg`` (every drafter of ``train.method`` is sized; the largest
    counts): the base replicated, or sharded over ``train.num_workers`` with ``shard_base``."""
    t = cfg.train
    shape = model_shape(cfg.model)
    n = t.num_workers
    base_bytes = 2 if on_gpu else 4
    replicated = shape.params * base_bytes
    base = replicated / n + shape.largest * base_bytes if shard_base and n > 1 else replicated
    # The drafter's dtype is what worker.deepspeed_config chooses: bf16 on GPU with ZeRO on, else fp32.
    bf16 = on_gpu and t.zero_stage > 0
    weight_bytes = 2 if bf16 else 4
    tokens = t.batch_size * t.max_length
    base_act = 2 * (4 * shape.hidden + 2 * shape.intermediate) * tokens * base_bytes
    logits = min(t.logits_chunk_tokens, tokens) * shape.vocab * 4 * 2
    drafter = optimizer = activations = 0.0
    for method in cfg.methods:
        trainable, frozen = drafter_params(method, t, shape)
        weights = trainable * weight_bytes / (n if t.zero_stage >= 3 else 1) + frozen * weight_bytes
        states = trainable * (8 + (4 if bf16 else 0)) / (n if t.zero_stage >= 1 else 1)
        grads = trainable * weight_bytes / (n if t.zero_stage >= 2 else 1)
        act = base_act + _drafter_activation_elems(method, t, shape) * tokens * weight_bytes + logits
        if weights + states + grads + act > drafter + optimizer + activations:
            drafter, optimizer, activations = weights, states + grads, act
    return TrainEstimate(base=base / GIB, drafter=drafter / GIB, optimizer=optimizer / GIB,
                         activations=activations / GIB, shard_base=bool(shard_base and n > 1), num_workers=n,
                         replicated_base=replicated / GIB)


def _fits(estimate: TrainEstimate, memory_gib: float) -> bool:
    return estimate.total <= HEADROOM * memory_gib


def _with_workers(cfg: Config, n: int) -> Config:
    copy = cfg.model_copy(deep=True)
    copy.train.num_workers = n
    return copy


def _smallest_sharded(cfg: Config, on_gpu: bool, memory_gib: float) -> int | None:
    """The fewest workers (2 .. MAX_WORKERS) whose sharded estimate fits, or None. The estimate only falls as
    workers are added, so a binary search finds it."""
    def fits(n: int) -> bool:
        return _fits(train_estimate(_with_workers(cfg, n), on_gpu, True), memory_gib)

    if not fits(MAX_WORKERS):
        return None
    lo, hi = 2, MAX_WORKERS
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


def check_train(cfg: Config, on_gpu: bool, worker_memory_gib: float | None) -> bool:
    """Whether training shards the base (``train.shard_base``), refusing in one line when nothing fits.

    ``true``/``false`` are honoured (one that does not fit is refused). ``auto``: replicated when that fits in
    ``HEADROOM`` of ``worker_memory_gib``, else sharded when there are several workers and that fits, else
    refused. Sharding does not need ``train.zero_stage=3``: the base gets a ZeRO-3 engine of its own. With no
    known ``worker_memory_gib`` nothing is refused and ``auto`` means replicated.
    """
    t = cfg.train
    wanted = t.shard_base
    if worker_memory_gib is None:
        return wanted is True
    if wanted is not True:
        replicated = train_estimate(cfg, on_gpu, False)
        if _fits(replicated, worker_memory_gib):
            return False
    if wanted is True or (wanted == "auto" and t.num_workers > 1):  # one worker's "share" is the whole base
        sharded = train_estimate(cfg, on_gpu, True)
        if _fits(sharded, worker_memory_gib):
            return True
    # Nothing fits: say what would.
    shown = train_estimate(cfg, on_gpu, wanted is not False and t.num_workers > 1)
    need = (f"train: needs ≈ {shown.total:.1f} GiB per worker ({shown.parts()}; the whole base is "
            f"{shown.replicated_base:.1f} GiB); a worker has {worker_memory_gib:g} GiB of "
            f"{'GPU memory' if on_gpu else 'RAM'}, {HEADROOM:.0%} of it planned")
    n = _smallest_sharded(cfg, on_gpu, worker_memory_gib)
    if n is None:
        raise UserError(f"{need}: even train.num_workers={MAX_WORKERS} with train.shard_base=true does not fit; "
                        "use workers with more memory, or a smaller train.batch_size, max_length or drafter")
    if wanted is False:
        more = "" if n <= t.num_workers else f" and train.num_workers={n}"
        raise UserError(f"{need}: use train.shard_base=true{more} (you asked for {t.num_workers} workers, "
                        "replicated)")
    raise UserError(f"{need}: use train.num_workers={n} with train.shard_base=true (you asked for {t.num_workers})")


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _node_gpu_memory(resources: dict[str, float]) -> float | None:
    types = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
    sizes = [GPU_MEMORY_GIB[t] for t in types if t in GPU_MEMORY_GIB]
    return float(min(sizes)) if sizes else None


def gpu_memory_gib() -> float | None:
    """Memory of the smallest GPU the Ray cluster has or its autoscaler can add, by accelerator type
    (``GPU_MEMORY_GIB``); None without Ray, or when a GPU node's type is not in the table."""
    if not _ray_up():
        return None
    resources = [n.get("Resources") or {} for n in _alive_nodes()]
    try:
        from medusa_ray.cluster import autoscaler_node_types

        resources += autoscaler_node_types() or []
    except LookupError:
        pass
    sizes = [_node_gpu_memory(r) for r in resources if r.get("GPU", 0) > 0]
    if not sizes or any(s is None for s in sizes):
        return None
    return min(sizes)


def worker_memory_gib(cfg: Config, on_gpu: bool) -> float | None:
    """Memory one training worker may use: ``train.worker_memory_gb`` when set; else on GPU the GPU's memory
    (``gpu_memory_gib``), on CPU the smallest worker node's Ray ``memory`` resource divided among the workers
    that land on it (``ceil(num_workers / nodes)``, as Ray Train spreads them; the 0-CPU head is no worker
    node). None when it cannot be known (no Ray, an unknown GPU)."""
    t = cfg.train
    if t.worker_memory_gb is not None:
        return float(t.worker_memory_gb)
    if not _ray_up():
        return None
    if on_gpu:
        return gpu_memory_gib()
    nodes = [n.get("Resources") or {} for n in _alive_nodes()]
    nodes = [r for r in nodes if r.get("CPU", 0) > 0 and r.get("memory", 0) > 0]
    if not nodes:
        return None
    per_node = math.ceil(t.num_workers / len(nodes))
    return min(r["memory"] for r in nodes) / GIB / per_node


# ---- engines ----------------------------------------------------------------------------------------------

@dataclass
class EngineEstimate:
    """GiB each GPU of one vLLM engine needs."""
    weights: float
    kv_cache: float
    """One ``max_model_len`` sequence's KV cache: vLLM refuses to start without room for it."""
    activations: float
    gpus: int

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations


def _bytes_per_weight(engine_kwargs: dict[str, Any]) -> int:
    dtype = str(engine_kwargs.get("dtype", "auto")).lower()
    return 4 if dtype in ("float32", "float") else 2


def engine_estimate(cfg: Config, engine_kwargs: dict[str, Any], gpu_memory_gib: float) -> EngineEstimate:
    """Per-GPU memory of a vLLM engine for ``cfg.model`` with these kwargs on GPUs of ``gpu_memory_gib``."""
    shape = model_shape(cfg.model)
    gpus = int(engine_kwargs.get("tensor_parallel_size") or 1) * int(engine_kwargs.get("pipeline_parallel_size") or 1)
    b = _bytes_per_weight(engine_kwargs)
    tokens = int(engine_kwargs.get("max_model_len") or shape.max_positions or 4096)
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * b * tokens
    return EngineEstimate(weights=shape.params * b / gpus / GIB, kv_cache=kv / gpus / GIB,
                          activations=ENGINE_ACTIVATIONS * gpu_memory_gib, gpus=gpus)


def _max_gpus_per_node() -> int | None:
    """GPUs of the biggest node the cluster has or its autoscaler can add; None when unknown (no Ray)."""
    if not _ray_up():
        return None
    counts = [int((n.get("Resources") or {}).get("GPU", 0)) for n in _alive_nodes()]
    try:
        from medusa_ray.cluster import autoscaler_node_types

        counts += [int(r.get("GPU", 0)) for r in autoscaler_node_types() or []]
    except LookupError:
        return None  # node types we cannot read may be bigger
    return max(counts, default=0)


def check_engine(cfg: Config, section: str, engine_kwargs: dict[str, Any], gpu_memory_gib: float | None) -> dict:
    """``engine_kwargs`` for a vLLM engine of ``cfg.model`` on GPUs of ``gpu_memory_gib``, refusing in one line
    what cannot start.

    When the base does not fit one GPU and ``tensor_parallel_size`` is not set, the smallest power of two
    (up to ``MAX_TP``, dividing the attention heads) that fits is set, and said in one line; a set one that does
    not fit is refused with the size that would. ``<section>`` names the config section in messages
    (``distill``, ``eval``). The GPUs one engine needs must be on one node (``tensor_parallel_size`` for a Serve
    replica, whose pipeline stages may span nodes; all ``tp x pp`` for eval's single task): refused when no node
    the cluster has or can add has that many. ``gpu_memory_gib`` None (CPU, an unknown GPU) checks nothing.
    """
    kwargs = dict(engine_kwargs)
    if gpu_memory_gib is None:
        return kwargs
    shape = model_shape(cfg.model)
    if shape.quantized or kwargs.get("quantization"):
        log.debug("preflight: %s is quantized; vLLM's memory is not estimated", cfg.model)
        return kwargs
    budget = float(kwargs.get("gpu_memory_utilization") or 0.9) * gpu_memory_gib

    def fits(tp: int) -> bool:
        return engine_estimate(cfg, {**kwargs, "tensor_parallel_size": tp}, gpu_memory_gib).total <= budget

    def describe(tp: int) -> str:
        e = engine_estimate(cfg, {**kwargs, "tensor_parallel_size": tp}, gpu_memory_gib)
        return (f"{section}: the vLLM engine needs ≈ {e.total:.1f} GiB per GPU at tensor_parallel_size={tp} "
                f"(weights {e.weights:.1f}, KV cache for one max_model_len sequence {e.kv_cache:.1f}, activations "
                f"{e.activations:.1f}); {budget:.1f} GiB of each {gpu_memory_gib:g} GiB GPU is the engine's")

    candidates = [tp for tp in (1, 2, 4, 8) if tp <= MAX_TP and shape.heads % tp == 0]
    smallest = next((tp for tp in candidates if fits(tp)), None)
    pp = int(kwargs.get("pipeline_parallel_size") or 1)
    if "tensor_parallel_size" in kwargs:
        tp = int(kwargs["tensor_parallel_size"] or 1)
        if not fits(tp):
            fix = (f"set {section}.engine_kwargs.tensor_parallel_size={smallest}" if smallest and smallest > tp
                   else f"raise {section}.engine_kwargs.pipeline_parallel_size (now {pp}), or lower max_model_len")
            raise UserError(f"{describe(tp)}: {fix}")
    elif not fits(1):
        if smallest is None:
            raise UserError(f"{describe(candidates[-1])}: even tensor_parallel_size={candidates[-1]} does not "
                            f"fit; set {section}.engine_kwargs.pipeline_parallel_size (stages across nodes) or "
                            "lower max_model_len")
        kwargs["tensor_parallel_size"] = tp = smallest
        print(f"{section}: the base does not fit one {gpu_memory_gib:g} GiB GPU; vLLM runs it with "
              f"tensor_parallel_size={tp} (set {section}.engine_kwargs.tensor_parallel_size to choose)", flush=True)
    else:
        tp = 1
    needed = tp * pp if section == "eval" else tp
    biggest = _max_gpus_per_node() if needed > 1 else None
    if biggest is not None and biggest < needed:
        what = "tensor_parallel_size x pipeline_parallel_size" if section == "eval" else "tensor_parallel_size"
        raise UserError(f"{section}: one vLLM engine needs {needed} GPUs on one node ({what}), but no node the "
                        f"cluster has or can add has more than {biggest}; add a node type with {needed} GPUs")
    return kwargs


def prepare_engine(cfg: Config, section: str, engine_kwargs: dict[str, Any], accelerator: str) -> dict:
    """``check_engine`` with the cluster's GPU memory; unchanged kwargs on CPU, or when the model's config cannot
    be read here (vLLM, which reads it on a worker, says what is wrong then)."""
    if accelerator != "gpu":
        return dict(engine_kwargs)
    try:
        model_shape(cfg.model)
    except UserError as exc:
        log.warning("%s; the vLLM engine's memory is not checked", exc)
        return dict(engine_kwargs)
    return check_engine(cfg, section, engine_kwargs, gpu_memory_gib())

