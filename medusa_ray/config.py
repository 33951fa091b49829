"""One validated configuration object for every stage.

A run is described by a YAML file plus dotted command-line overrides (``train.num_workers=2``).
Everything is validated up front, so a typo fails in one line naming the key instead of deep
inside a Ray worker twenty minutes later.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medusa_ray.errors import UserError


class ConfigError(UserError):
    """A configuration problem, phrased as one line that names the offending key."""


class _Section(BaseModel):
    # Unknown keys are errors, and assignments are re-validated, so a config can never hold junk.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, protected_namespaces=(), use_attribute_docstrings=True
    )


class RayConfig(_Section):
    address: Optional[str] = None
    """Cluster to join: ``auto`` (a running cluster, as under ``ray job submit``) or ``ray://host:10001``.
    Empty starts a local cluster."""
    num_cpus: Optional[int] = Field(None, ge=1)
    """Logical CPUs of a local cluster. Default: enough that a Serve replica and Ray Data actors fit
    side by side even on a 2-core machine."""
    object_store_gb: Optional[float] = Field(None, gt=0)
    """Object store size of a local cluster (default: Ray's, 30% of RAM)."""


class DistillConfig(_Section):
    input: Optional[str] = None
    """Prompts: ShareGPT JSON, messages JSONL, Parquet with a ``messages`` column, or a ``datasets`` dir."""
    format: Literal["auto", "sharegpt", "jsonl", "parquet", "hf"] = "auto"
    """Input format; ``auto`` detects it from the file name and content."""
    output_dir: str = "outputs/distill"
    """Sharded Parquet output (errors under ``errors/``); re-running skips conversations already there."""
    limit: Optional[int] = Field(None, ge=1)
    """Distill only the first N conversations."""
    mode: Literal["chat", "completion"] = "chat"
    """``chat`` applies the base model's chat template; ``completion`` treats the prompt as raw text."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """Sampling temperature (0 = greedy; at most 2, as vLLM and OpenAI's API accept)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(256, ge=1)
    """Maximum tokens generated per assistant turn."""
    seed: int = 0
    """Sampling seed."""
    samples_per_prompt: int = Field(1, ge=1)
    """Replies generated per input conversation, each its own row (ids ``<id>``, ``<id>#s1``, ``<id>#s2``...,
    each sample with its own seeds); needs ``temperature > 0``. Training keeps a prompt's samples together on
    one side of the validation split."""
    endpoint: Optional[str] = None
    """Use an existing OpenAI-compatible server (vLLM, TGI) at this base URL instead of a Serve deployment."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key, if it needs one."""
    num_replicas: int = Field(1, ge=1)
    """vLLM Serve replicas (fixed), unless min/max_replicas turn on autoscaling."""
    min_replicas: Optional[int] = Field(None, ge=0)
    """Autoscaling lower bound (replicas scale with queued requests)."""
    max_replicas: Optional[int] = Field(None, ge=1)
    """Autoscaling upper bound."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where vLLM runs; ``auto``: GPU when the cluster has GPUs or its autoscaler can add them."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to the vLLM engine (e.g. ``max_model_len``, ``tensor_parallel_size``)."""
    max_in_flight: Optional[int] = Field(None, ge=1)
    """Requests kept in flight per vLLM replica, so its continuous batching always has a full batch. Default:
    ``engine_kwargs.max_num_seqs``, else 256 (and the engine's ``max_num_seqs`` is set to match). With
    autoscaling, also the ongoing requests per replica Serve scales on."""
    engine_metrics: bool = False
    """Export vLLM's engine metrics (time to first token, inter-token latency...) to Ray's Prometheus endpoint.
    Off by default: recording them costs the replica CPU on every generated token."""
    concurrency: int = Field(1, ge=1)
    """Ray Data actors driving conversations (each an asyncio loop holding its share of the requests in flight);
    one keeps hundreds of requests going."""
    shard_size: int = Field(256, ge=1)
    """Conversations per output Parquet shard (at most): a shard is written once all its conversations are
    finished, and is the unit of resume."""
    max_retries: int = Field(2, ge=0)
    """Extra attempts for a failed request before it is recorded in ``<output_dir>/errors``. A reply cut at
    ``max_tokens`` is kept as a training row (``finish_reason: length``) and ends its conversation.
    A re-run retries recorded failures (a replica lost to a preemption, a 5xx, a timeout); empty replies and
    invalid inputs stay done (delete ``errors/`` to retry those too)."""
    retry_backoff_s: float = Field(2.0, ge=0.0)
    """Wait before retrying a failed request: this many seconds, doubling with each attempt (at most 60 s), so
    a restarting replica or an overloaded endpoint gets time to recover."""
    request_timeout_s: float = Field(600.0, gt=0.0)
    """A request with no reply after this long counts as failed (and is retried)."""

    @model_validator(mode="after")
    def _replica_bounds(self) -> "DistillConfig":
        if self.min_replicas is not None and self.max_replicas is not None:
            if self.min_replicas > self.max_replicas:
                raise ValueError("min_replicas must not exceed max_replicas")
        if self.samples_per_prompt > 1 and self.temperature == 0:
            raise ValueError(f"samples_per_prompt={self.samples_per_prompt} needs temperature > 0 (greedy replies to "
                             "one prompt are identical)")
        return self


class DrafterKeys(_Section):
    """A drafter's own ``train.*`` keys (defined in its module under ``medusa_ray/drafters``, registered with
    ``register_drafter_keys``): validated with the rest of ``train``, and present whatever the method."""


_DRAFTER_KEYS: dict[str, type[DrafterKeys]] = {}
_UNKNOWN = "[unknown key] "


def register_drafter_keys(method: str, keys: type[DrafterKeys]) -> None:
    """Make ``train.method=<method>`` valid and ``keys``' fields ``train.*`` keys."""
    taken = {k: m for m, model in _DRAFTER_KEYS.items() if m != method for k in model.model_fields}
    clash = [k for k in keys.model_fields if k in taken or k in TrainConfig.model_fields]
    if clash:
        raise ValueError(f"drafter {method!r}: config key {clash[0]!r} is already taken")
    _DRAFTER_KEYS[method] = keys


def drafter_methods() -> list[str]:
    return list(_DRAFTER_KEYS)


class TrainConfig(_Section):
    # The registered drafters' keys arrive as extras and are validated by their own models (_drafter_keys).
    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=(),
                              use_attribute_docstrings=True)

    data: Optional[str] = None
    """Distilled Parquet to train on. Default: ``distill.output_dir``."""
    method: Union[str, list[str]] = "medusa"
    """The drafter: ``medusa`` heads or an ``eagle3`` draft layer (any registered drafter). In ``pipeline`` a list
    (``[medusa, eagle3]``) trains each on the same distilled data, evaluates both on the same prompts and names
    the faster."""
    head_decay: float = Field(0.8, gt=0.0, le=1.0)
    """Loss weight of draft position k is ``head_decay ** k``."""
    max_length: int = Field(512, ge=8)
    """Tokens per training sequence; longer conversations are truncated (and counted)."""
    logits_chunk_tokens: int = Field(1024, ge=1)
    """Tokens per chunk when computing head logits: bounds peak memory at large vocabularies."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU on GPU nodes)."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Train on GPUs; ``auto``: when the cluster has GPUs or its autoscaler can add them."""
    zero_stage: int = Field(2, ge=0, le=3)
    """DeepSpeed ZeRO stage (of the drafter)."""
    shard_base: Literal["auto", True, False] = "auto"
    """Partition the frozen base across the workers (ZeRO-3), loaded one safetensors file at a time, so that no
    worker ever holds all of it. ``auto``: when the base does not fit one worker beside the drafter (the
    preflight estimate) and there are several workers."""
    feature_cache: Literal["auto", True, False] = "auto"
    """Keep what the drafter reads of the frozen base (its hidden states) for every row in the run's storage after
    the first pass, and read it back in later epochs, validations, resumes and retries instead of running the base.
    ``auto``: when the run plans more than one pass and the cache fits ``feature_cache_max_gb``."""
    feature_cache_max_gb: float = Field(100.0, gt=0)
    """``feature_cache: auto`` turns the cache off above this size (tokens x hidden size x bytes x layers)."""
    worker_memory_gb: Optional[float] = Field(None, gt=0)
    """Memory one training worker may use (GPU memory on GPUs, RAM on CPU), for the preflight check. Default:
    the GPU's memory, or the node's RAM divided among the workers on it."""
    batch_size: int = Field(8, ge=1)
    """Sequences per worker per micro-step."""
    grad_accum: int = Field(1, ge=1)
    """Micro-steps per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    """Peak learning rate (linear warmup, then cosine decay)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    """Linear warmup over this share of the planned steps (the Medusa recipe's 0.1)."""
    warmup_steps: Optional[int] = Field(None, ge=0)
    """Warmup steps; overrides ``warmup_ratio`` when set."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Train exactly this many optimizer steps (no early stopping); overrides ``epochs``."""
    epochs: Optional[int] = Field(None, ge=1)
    """Train exactly this many passes over the data (no early stopping)."""
    max_epochs: int = Field(40, ge=1)
    """Without ``max_steps``/``epochs``: at most this many passes; the stop rule usually ends a run first. It
    also sets the planned steps the learning rate decays over. At 20, on ``benchmarks/recipe.py``'s 399
    conversations, the rate had nearly reached zero when the rule stopped both drafters in the last tenth of
    the plan; 40 raised vLLM's acceptance (Medusa 1.770 to 1.825, EAGLE-3 2.337 to 2.469)."""
    min_steps: int = Field(100, ge=0)
    """Without ``max_steps``/``epochs``: never stop early before this step."""
    step_budget: int = Field(20000, ge=1)
    """Without ``max_steps``/``epochs``: at most this many optimizer steps, whatever the data size."""
    patience: int = Field(5, ge=1)
    """Stop after this many validations in a row without an improvement (``min_improvement``; after
    ``min_steps``)."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of conversations held back for validation (0 turns validation and early stopping off)."""
    val_min_rows: int = Field(20, ge=1)
    """At least this many validation conversations (but never more than a tenth of the data)."""
    val_max_rows: int = Field(500, ge=1)
    """At most this many validation conversations (unless ``val_min_tokens`` needs more)."""
    val_min_tokens: int = Field(20000, ge=0)
    """Validation takes more conversations while their replies hold fewer tokens than this, up to a tenth of
    the data: the stop rule needs enough tokens to tell progress from noise (0: size it by conversations only)."""
    min_improvement: float = Field(0.002, ge=0.0)
    """A validation counts as an improvement only when its smoothed expected acceptance beats the best so far by
    this share (0.002: 0.2%); ``patience`` counts validations without one."""
    val_smoothing: float = Field(0.5, ge=0.0, lt=1.0)
    """Early stopping and the best checkpoint follow an exponential moving average of the validation expected
    acceptance (``s * previous + (1 - s) * new``), not one noisy validation (0: the raw value)."""
    val_every: Optional[int] = Field(None, ge=1)
    """Validate every N optimizer steps. Default: twice per epoch, between 10 and 500 steps."""
    max_bad_rows: float = Field(0.01, ge=0.0)
    """Rows that cannot be templated or masked are skipped and counted; more than this share of the
    training rows (or, when >= 1, this many rows) fails the run."""
    seed: int = 0
    """Seed for head initialisation, the validation split and the data order (reshuffled every epoch)."""
    deepspeed_config: Optional[str] = None
    """A full DeepSpeed JSON config; replaces the one built from the keys above."""
    storage_path: str = "outputs/ray_results"
    """Where Ray Train keeps checkpoints: a local path, NFS mount or ``s3://`` URI shared by all nodes."""
    run_name: str = "medusa"
    """Ray Train run name; re-running with the same name and storage path resumes."""
    checkpoint_every: Optional[int] = Field(None, ge=1)
    """Save a checkpoint every N optimizer steps (and at the end). Default: at every validation."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept in storage: the best by validation expected acceptance, plus always the latest."""
    max_failures: int = Field(1, ge=0)
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    log_every: int = Field(1, ge=1)
    """Write metrics (``metrics.jsonl`` and the trackers) every N steps."""
    tracking: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers receiving the metrics (rank 0 only)."""
    wandb_project: str = "medusa-ray"
    """W&B project."""
    wandb_entity: Optional[str] = None
    """W&B entity (team or user)."""
    mlflow_tracking_uri: Optional[str] = None
    """Default: a local ``file:`` store inside the run's storage path."""
    mlflow_experiment: str = "medusa-ray"
    """MLflow experiment name."""

    @model_validator(mode="after")
    def _drafter_keys(self) -> "TrainConfig":
        for method in ([self.method] if isinstance(self.method, str) else self.method):
            if method not in _DRAFTER_KEYS:
                raise ValueError(f"[method] unknown drafter {method!r} (known: {', '.join(_DRAFTER_KEYS)})")
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        owner = {key: model for model in _DRAFTER_KEYS.values() for key in model.model_fields}
        for key in extra:
            if key not in owner:
                raise ValueError(f"{_UNKNOWN}{key}")
        for model in _DRAFTER_KEYS.values():
            given = {k: v for k, v in extra.items() if k in model.model_fields}
            try:
                extra.update(model.model_validate(given).model_dump())
            except ValidationError as exc:
                error = exc.errors()[0]
                key = ".".join(str(p) for p in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                raise ValueError(f"[{key}] {message} (got {error.get('input')!r})") from None
        return self


class PushIf(_Section):
    min_acceptance_length: Optional[float] = Field(None, ge=1.0)
    """Push only when vLLM's measured acceptance length is at least this."""
    min_speedup: Optional[float] = Field(None, gt=0.0)
    """Push only when the measured speed-up is at least this."""


class ExportConfig(_Section):
    output_dir: str = "outputs/export"
    """Export directory (``medusa_lm_head.safetensors``, ``config.json``, tokenizer, model card)."""
    push_to_hub: Optional[str] = None
    """``org/name`` to push the export to (token from ``HF_TOKEN`` or the Hugging Face login)."""
    private: Optional[bool] = None
    """``true``: the Hub repo must be private (an existing public one is refused before anything is uploaded);
    ``false``: create it public; unset: the account's or organisation's default."""
    overwrite: bool = False
    """Replace an existing, different export in ``output_dir``."""
    push_if: Optional[PushIf] = None
    """In ``pipeline``: push to ``push_to_hub`` only when eval's numbers clear these thresholds
    (``{min_acceptance_length: 1.5, min_speedup: 1.1}``; the speed-up is the load benchmark's at
    ``eval.target_concurrency`` when ``eval.bench`` ran, else eval's offline one). Unset: always push."""


class EvalConfig(_Section):
    prompts: Optional[str] = None
    """Prompts to decode. Default: conversations held back from distillation."""
    num_prompts: int = Field(16, ge=1)
    """Prompts to decode."""
    max_tokens: int = Field(64, ge=1)
    """Tokens generated per prompt."""
    num_speculative_tokens: Optional[int] = Field(None, ge=1)
    """Draft tokens per step. Default: the number of trained heads."""
    heldout: Optional[str] = None
    """Distilled Parquet for teacher-forced per-head accuracy."""
    output_json: Optional[str] = None
    """Write the results as JSON here."""
    plot: Optional[str] = None
    """Write a PNG of acceptance per position (and per-head accuracy) here."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to both vLLM engines."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where the vLLM engines run; ``auto``: GPU when the cluster has GPUs or its autoscaler can add them."""
    compare_untrained: bool = True
    """In ``pipeline``: also measure heads of the same shape before training, to show what training bought."""
    concurrency: list[int] = Field(default_factory=lambda: [1, 4, 16, 64], min_length=1)
    """Load benchmark (``medusa-ray bench``): concurrent OpenAI clients, one level after another."""
    target_concurrency: Optional[int] = Field(None, ge=1)
    """The load you serve: the level whose speed-up chooses between drafters and gates ``export.push_if``.
    Default: the largest of ``concurrency``."""
    bench: bool = False
    """In ``pipeline``: after eval, also run the load benchmark through Serve (each drafter and the plain base)."""
    bench_requests: int = Field(32, ge=1)
    """Requests per concurrency level (at least one per client); the same prompts, in the same order, for the base
    and each drafter."""
    bench_timeout_s: float = Field(600.0, gt=0.0)
    """One concurrency level's time limit: requests not done by then are cancelled and counted as failed."""
    bench_output_json: Optional[str] = None
    """Write the benchmark's results as JSON here (default: beside the plot)."""
    bench_plot: Optional[str] = None
    """PNG of speed-up against concurrency (default: ``bench.png`` beside the first drafter's export)."""

    @model_validator(mode="after")
    def _levels(self) -> "EvalConfig":
        if any(c < 1 for c in self.concurrency):
            raise ValueError("concurrency levels must be at least 1")
        return self


class ServeConfig(_Section):
    model_id: Optional[str] = None
    """The name clients put in ``model``. Default: the base's Hub id, or its directory name."""
    app_name: str = "medusa-ray"
    """The Serve application's name (``serve status``)."""
    host: str = "127.0.0.1"
    """Where Serve's HTTP proxy listens: loopback by default; ``0.0.0.0`` to serve the cluster's network (the
    app has no authentication of its own: put it behind your gateway)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of Serve's proxy (the OpenAI API is at ``http://HOST:PORT/v1``)."""
    num_replicas: int = Field(1, ge=1)
    """vLLM replicas (fixed), unless ``min_replicas``/``max_replicas`` turn on autoscaling."""
    min_replicas: Optional[int] = Field(None, ge=0)
    """Autoscaling lower bound."""
    max_replicas: Optional[int] = Field(None, ge=1)
    """Autoscaling upper bound."""
    target_ongoing_requests: int = Field(16, ge=1)
    """With autoscaling: requests in flight per replica that Serve scales towards (fewer: lower latency, more
    replicas)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where vLLM runs; ``auto``: GPU when the cluster has GPUs or its autoscaler can add them."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to the vLLM engine (``max_model_len``, ``tensor_parallel_size``, ``max_num_seqs``...)."""
    num_speculative_tokens: Optional[int] = Field(None, ge=1)
    """Draft tokens per step. Default: the drafter's trained positions."""
    engine_metrics: bool = True
    """Export vLLM's metrics (latencies, spec-decode acceptance) to Ray's Prometheus endpoint; the load benchmark
    reads the acceptance length from them."""
    stream_batching_interval_ms: Optional[float] = Field(None, ge=0.0)
    """Serve LLM sends a stream's tokens in batches this often (its default: 50 ms); 0 sends every engine step
    as it comes, which is what time-to-first-token and inter-token latency measure best."""
    startup_timeout_s: float = Field(1800.0, gt=0.0)
    """Give up when the app is not healthy after this long (first start downloads and loads the base)."""
    capture: bool = False
    """Record the prompts the app receives (opt-in) as messages JSONL that ``distill.input`` reads."""
    capture_dir: Optional[str] = None
    """Where captured prompts go (a directory every replica's node can write). Default:
    ``<distill.output_dir>/../traffic``."""
    capture_rate: float = Field(1.0, gt=0.0, le=1.0)
    """Share of chat requests recorded (sampled per request)."""
    capture_max_mb: float = Field(100.0, gt=0.0)
    """Stop recording once the replica's capture file reaches this size."""

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServeConfig":
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class Config(_Section):
    model: str = "outputs/tiny-model"
    """Base model: a local directory or a Hugging Face Hub id."""
    ray: RayConfig = Field(default_factory=RayConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @property
    def train_data(self) -> str:
        return self.train.data or self.distill.output_dir

    @property
    def methods(self) -> list[str]:
        """``train.method`` as a list (one entry unless ``pipeline`` compares drafters)."""
        m = self.train.method
        return list(dict.fromkeys(m)) if isinstance(m, list) else [m]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML scalars give the natural types: 2 -> int, true -> bool, [a, b] -> list, null -> None.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith(_UNKNOWN):  # a key no registered drafter owns
        return f"{key}.{message.removeprefix(_UNKNOWN)}: unknown key"
    if message.startswith("[") and "] " in message:  # a drafter's own key, named by its section
        inner, rest = message[1:].split("] ", 1)
        return f"{key}.{inner}: {rest}"
    if "input" in error and error["type"] != "missing" and not isinstance(error["input"], dict):
        return f"{key}: {message} (got {error['input']!r})"
    return f"{key}: {message}"


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a config tree plus dotted overrides; raise ConfigError with a one-line message."""
    tree: dict[str, Any] = dict(data or {})
    for text in overrides or []:
        parts, value = _parse_override(text)
        _set_dotted(tree, parts, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"invalid config: {_describe(errors[0])}{more}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (if given), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        data = loaded or {}
    return build_config(data, overrides)


def reference_markdown() -> str:
    """The config reference table (docs/config.md), generated from the field docstrings above and the registered
    drafters' keys."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]

    def type_name(annotation) -> str:
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is Literal:
            return " \\| ".join(str(a) for a in args)
        if origin is list:
            return f"list of {type_name(args[0])}"
        if origin is dict:
            return "mapping"
        if args and type(None) in args:  # Optional[X]
            return type_name(next(a for a in args if a is not type(None)))
        if origin is Union:
            return " or ".join(type_name(a) for a in args)
        return getattr(annotation, "__name__", str(annotation))

    def default(field) -> str:
        value = field.get_default(call_default_factory=True)
        return "—" if value is None or value == {} else f"`{value}`"

    def describe(field) -> str:
        return " ".join((field.description or "").split()).replace("``", "`").replace("|", "\\|")

    for name, field in Config.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, _Section):
            fields = dict(section.model_fields)
            if section is TrainConfig:  # each registered drafter's own keys, after the shared ones
                for keys in _DRAFTER_KEYS.values():
                    fields.update(keys.model_fields)
            for key, sub in fields.items():
                rows.append(f"| `{name}.{key}` | {type_name(sub.annotation)} | {default(sub)} | {describe(sub)} |")
        else:
            rows.append(f"| `{name}` | {type_name(field.annotation)} | {default(field)} | {describe(field)} |")
    return "\n".join(rows)
