"""The training loop that runs on every Ray Train worker: a frozen base and a drafter under DeepSpeed.

Only the drafter goes to ``deepspeed.initialize``, so the optimizer, ZeRO partitioning and the checkpoint hold
nothing but its parameters, under its own state_dict keys. The base runs its decoder only (no lm_head, no
logits) under ``no_grad``; what the drafter reads of it is the drafter's business (``medusa_ray.drafters``).

``Trainer`` is the loop, in the order a reader meets it: ``__init__`` sets up (base, drafter, engine, resume,
tracker, validation rows), ``run`` goes over the epochs, ``step`` is one optimizer step, ``validate``,
``checkpoint`` and ``finish``. A ``Session`` is what it needs from its surroundings: Ray Train's on a worker,
a plain one without Ray (the GPU smoke test).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_ray import checkpoint, drafters
from medusa_ray.config import Config
from medusa_ray.data import IGNORE_INDEX, BadRowError
from medusa_ray.drafters import Drafter, expected_acceptance
from medusa_ray.logs import verbose
from medusa_ray.train import run_files
from medusa_ray.train.data import collate, tokenize_batch
from medusa_ray.train.features import FeatureSource, FeatureStore
from medusa_ray.train.plan import (
    DataPlan,
    RowReader,
    epoch_units,
    to_columns,
    validation_rows,
)
from medusa_ray.train.plan import batches as plan_batches

log = logging.getLogger(__name__)

FAIL_MARKER = ".fail_at_step_{step}.done"  # starts with run_files.FAIL_MARKER_PREFIX: mirrored with the run


@dataclass
class Progress:
    """What a checkpoint must remember besides the weights: where in the data we are."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    rows: int = 0  # all ranks, cumulative
    tokens: int = 0
    truncated: int = 0
    retokenized: int = 0  # rows trained on re-tokenized text: their replies came without generated token ids
    bad_rows: int = 0  # rows skipped because they cannot be templated or masked (all ranks)
    bad_examples: list = field(default_factory=list)  # the first few, "id=...: reason"
    best_val: float = -1.0  # best smoothed validation expected acceptance so far
    best_step: int = 0
    since_best: int = 0  # validations since the last improvement by train.min_improvement
    stopped_early: bool = False
    smoothed: float = -1.0  # the moving average of validation expected acceptance (train.val_smoothing)
    bar: float = -1.0  # the smoothed value the next improvement must beat by train.min_improvement
    stop_reason: str = ""


@dataclass
class Schedule:
    """How long to train, decided by the driver (``train.schedule``)."""

    total_steps: int
    """Steps the learning-rate schedule spans; the run's last step unless it stops early."""
    warmup_steps: int
    val_every: int
    checkpoint_every: int
    early_stopping: bool
    """Stop once validation stops improving (``patience``), not before ``min_steps``."""
    min_steps: int = 0
    patience: int = 0
    min_improvement: float = 0.0
    """An improvement beats the last one by this share."""
    smoothing: float = 0.0
    """Weight of the previous value in the moving average of validation expected acceptance."""
    max_epochs: int | None = None
    max_bad_rows: int = 0
    """More skipped rows than this fail the run."""



def load_base(cfg: Config, device, dtype):
    """The frozen base, whole in this process: every parameter requires_grad=False, in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    base.requires_grad_(False)
    base.eval()
    return base.to(device)


def frozen_base(cfg: Config, device, dtype, needed: bool = True):
    """(the base model, its ZeRO-3 engine or None). With ``train.shard_base`` (the driver resolved ``auto``) the base
    is partitioned across the workers by an engine of its own (``medusa_ray.model.base.sharded_base``), which
    must stay alive: its hooks gather each layer during the forward. Otherwise ``load_base``. Not ``needed`` (the
    feature cache holds every row): a skeleton on the meta device, its config and shapes without any weights."""
    if not needed:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model), dtype=dtype)
        return skeleton.requires_grad_(False).eval(), None
    if cfg.train.shard_base is True:
        from medusa_ray.model.base import sharded_base

        engine = sharded_base(cfg.model, dtype, base_deepspeed_config(cfg, dtype))
        return engine.module, engine
    return load_base(cfg, device, dtype), None


def base_deepspeed_config(cfg: Config, dtype) -> dict[str, Any]:
    """The sharded base's engine: ZeRO-3 partitioning, no optimizer (nothing of the base trains). Each layer is
    released as soon as it has run: by default ZeRO-3 keeps a gathered parameter that will be used again within
    ``stage3_max_reuse_distance`` (1e9) parameters, which for a frozen base run forward after forward is all of it,
    and nothing would be saved."""
    import torch

    zero = {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
    return {"train_micro_batch_size_per_gpu": cfg.train.batch_size, "zero_optimization": zero,
            "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def decoder_of(base):
    """The transformer body without the lm_head: we only ever need its last hidden state."""
    get = getattr(base, "get_decoder", None)
    decoder = get() if get is not None else None
    return decoder if decoder is not None else base.model


def deepspeed_config(cfg: Config, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config built from ``train.*``, or the user's full JSON when ``train.deepspeed_config``."""
    t = cfg.train
    built = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": t.zero_stage},
        # torch's AdamW: DeepSpeed's own Adam ops would need a JIT compile (CPU Adam, FusedAdam).
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "torch_adam": True},
        },
        # A bf16 drafter only where ZeRO keeps fp32 master weights and optimizer states (stages 1-3); at stage 0
        # DeepSpeed would update bf16 weights directly, so the drafter (small next to the base) stays fp32 there.
        "bf16": {"enabled": on_gpu and t.zero_stage > 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not t.deepspeed_config:
        return built
    user = json.loads(Path(t.deepspeed_config).read_text())
    if not any(k in user for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
        user["train_micro_batch_size_per_gpu"] = t.batch_size
        user.setdefault("gradient_accumulation_steps", t.grad_accum)
    # Without an optimizer DeepSpeed would run forward/backward and never update anything.
    user.setdefault("optimizer", built["optimizer"])
    return user


def drafter_dtype(ds_config: dict[str, Any]):
    """The drafter's parameter dtype that the DeepSpeed config trains: bf16/fp16 when it enables them, else fp32."""
    import torch

    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warmup to the peak over ``warmup_steps`` updates, then cosine decay towards 0 at
    ``total_steps``. The first update already uses a non-zero rate (DeepSpeed's WarmupCosineLR
    spends its first two updates at 0)."""

    def factor(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / warmup_steps
        progress = min(1.0, (update - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def init_engine(module, ds_config: dict[str, Any], warmup_steps: int = 0, total_steps: int = 1):
    """DeepSpeed engine over the drafter only; our warmup + cosine schedule unless the config brings one. Its
    checkpoints load with ``weights_only`` (see ``SafeCheckpointEngine``)."""
    import deepspeed
    import torch

    if not verbose():
        # DeepSpeed narrates its config and every save at INFO on stdout through a handler of its own: hand its
        # records to this worker's logging, where INFO goes to the log file and warnings to the console.
        deepspeed.utils.logger.handlers.clear()
        deepspeed.utils.logger.propagate = True
    params = [p for p in module.parameters() if p.requires_grad]
    scheduler = None
    if "scheduler" not in ds_config:
        factor = lr_lambda(warmup_steps, total_steps)

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config,
                                           lr_scheduler=scheduler)
    engine.checkpoint_engine = safe_checkpoint_engine(engine.checkpoint_engine)
    return engine


def safe_checkpoint_engine(stock):
    """DeepSpeed's checkpoint engine, loading with ``torch.load(weights_only=True)``.

    Its own ``load`` unpickles with ``weights_only=False``, so whoever can write the run's storage (a shared
    volume, a bucket) would run code on every worker at resume. What DeepSpeed saves is tensors, containers and
    numbers plus a few of its own and torch's plain types, allow-listed here; anything else is refused by torch's
    restricted unpickler. Only the stock engine is wrapped (a user's own is theirs)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    if type(stock) is not TorchCheckpointEngine:
        return stock

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            import torch

            with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
                return torch.load(path, map_location=map_location, weights_only=True)

    stock.__class__ = SafeCheckpointEngine
    return stock


def _deepspeed_checkpoint_types() -> list:
    """The non-tensor types in what DeepSpeed's ``save_checkpoint`` writes for our engines."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


class Collectives:
    """Sums and agreements across ranks, computed on ``device``.

    Every tensor that enters a collective lives on the device the process group serves: NCCL (Ray Train's
    backend on GPUs) refuses CPU tensors with "No backend type associated with device type cpu".
    """

    def __init__(self, device):
        self.device = device

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        x = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(x)
        return x.cpu().tolist()

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (ranks stop an epoch together)."""
        import torch
        import torch.distributed as dist

        x = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN)
        return bool(x.cpu().item())


class Session:
    """What the loop needs from its surroundings; Ray Train's in ``train_loop``, a plain one without Ray."""

    rank: int = 0
    world: int = 1
    device: Any = None

    def resume_dir(self):
        """A context manager yielding the directory of the checkpoint to resume from, or None."""
        return contextlib.nullcontext(None)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        """Publish ``metrics``; with ``checkpoint_dir`` (every rank's files merged), register a checkpoint."""
        raise NotImplementedError


class RaySession(Session):
    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = _usable(ray.train.torch.get_device())

    def resume_dir(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext(None)

    def report(self, metrics, checkpoint_dir, step):
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=checkpoint.checkpoint_dir_name(step))


def _usable(device):
    """Ray hands a worker a GPU it was granted; a node that only declares GPUs (``ray start --num-gpus`` with no
    CUDA) has none to give, and the worker trains on CPU instead."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("this worker was granted a GPU but CUDA is not available here: training on CPU")
        return torch.device("cpu")
    return device


class LocalSession(Session):
    """One process, no Ray: checkpoints go to ``checkpoint_root`` (the GPU smoke test, tests).

    Needs a process group already (``torch.distributed.init_process_group``), as DeepSpeed does.
    """

    def __init__(self, device, checkpoint_root: Path):
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device
        self.checkpoint_root = Path(checkpoint_root)
        self.checkpoints: list[Path] = []

    def report(self, metrics, checkpoint_dir, step):
        if checkpoint_dir is None:
            return
        target = self.checkpoint_root / checkpoint.checkpoint_dir_name(step)
        shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        if target not in self.checkpoints:
            self.checkpoints.append(target)


def forward_backward(engine, features, batch, drafter: Drafter, device):
    """One micro-step: the drafter's loss on the base's ``features`` of ``batch``, DeepSpeed backward + step.
    (stats, tokens, learning rate used)."""
    loss, stats, mask = drafter.loss(engine, features, batch, device)
    engine.backward(loss)
    lr = float(engine.get_lr()[0])  # the rate this update uses (after step() it is the next one's)
    engine.step()
    return stats, int(mask.sum()), lr


def prepare_drafter(cfg_dict: dict[str, Any], plan_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The drafter's work over the training rows before the workers start (EAGLE-3: its draft vocabulary), as a
    Ray task: it streams every training row's labels once, in the same order every time."""
    cfg = Config.model_validate(cfg_dict)
    drafter = drafters.get(cfg.train.method)
    if not drafter.needs_preparation:
        return None
    plan = DataPlan.from_dict(plan_dict)
    t = cfg.train

    def label_rows():
        for batch in plan_batches(epoch_units(plan, t.seed, 0, 0, 1), RowReader(plan.columns), 256):
            yield from tokenize_batch(batch, cfg.model, t.max_length)["labels"]

    return drafter.prepare(cfg, label_rows())


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train ``train_loop_per_worker``."""
    from medusa_ray import logs

    logs.worker_setup()  # Ray Train gave this worker's root logger a console handler of its own
    return run_loop(Config.model_validate(config["cfg"]), RaySession(), DataPlan.from_dict(config["plan"]),
                    Schedule(**config["schedule"]), config["run_dir"], board=config.get("board"),
                    prepared=config.get("prepared"), faults=config.get("faults"),
                    features_complete=config.get("features_complete", False))


def run_loop(cfg: Config, session: Session, plan: DataPlan, schedule: Schedule, location: str,
             board=None, prepared: dict[str, Any] | None = None, faults: dict[str, Any] | None = None,
             features_complete: bool = False) -> dict[str, Any]:
    """Train the drafter on ``plan``'s rows for ``schedule``; validate, checkpoint, stop early (``Trainer``).
    ``features_complete``: the run's feature cache holds every row, so the base is never loaded."""
    return Trainer(cfg, session, plan, schedule, location, board, prepared, faults, features_complete).run()


def record_validation(p: Progress, s: Schedule, ea: float) -> None:
    """The stop rule, after a validation measured expected acceptance ``ea`` at step ``p.step``.

    One validation is noisy: the rule and the best checkpoint follow a moving average (``s.smoothing``), and only
    an improvement of it by ``s.min_improvement`` resets patience, so a run that creeps up by noise stops."""
    p.smoothed = ea if p.smoothed < 0 else s.smoothing * p.smoothed + (1 - s.smoothing) * ea
    if p.smoothed > p.best_val:
        p.best_val, p.best_step = p.smoothed, p.step
    if p.bar < 0 or p.smoothed > p.bar * (1 + s.min_improvement):
        p.bar, p.since_best = p.smoothed, 0
    else:
        p.since_best += 1
    if s.early_stopping and p.step >= s.min_steps and p.since_best >= s.patience:
        p.stopped_early = True
        p.stop_reason = (f"validation expected acceptance (smoothed) did not improve by {s.min_improvement:.1%} in "
                         f"{s.patience} validations; best {p.best_val:.3f} at step {p.best_step}")


class StepStats:
    """What micro-batches add up to until an optimizer step: the drafter's per-position stats and the counts.
    ``reduce`` sums them over every rank in one collective."""

    def __init__(self, steps: int, width: int):
        import torch

        self.per_position = torch.zeros(steps, width, dtype=torch.float64)
        self.tokens = self.rows = self.truncated = self.bad = self.retokenized = 0
        self.bad_examples: list[str] = []  # this rank's, for the error message

    def add(self, stats, tokens: int, rows: int, truncated: int, retokenized: int = 0) -> None:
        import torch

        self.per_position += stats.detach().to("cpu", torch.float64)
        self.tokens += tokens
        self.rows += rows
        self.truncated += truncated
        self.retokenized += retokenized

    def add_bad(self, reasons: list[str]) -> None:
        self.bad += len(reasons)
        self.bad_examples += reasons[:max(0, 5 - len(self.bad_examples))]

    def reduce(self, collectives: "Collectives") -> "StepStats":
        """The sums over all ranks (a collective: every rank calls it)."""
        import torch

        counts = [self.tokens, self.rows, self.truncated, self.bad, self.retokenized]
        summed = collectives.sum(self.per_position.flatten().tolist() + counts)
        total = StepStats(*self.per_position.shape)
        total.per_position = torch.tensor(summed[:-len(counts)], dtype=torch.float64).view_as(self.per_position)
        total.tokens, total.rows, total.truncated, total.bad, total.retokenized = (
            int(v) for v in summed[-len(counts):])
        total.bad_examples = list(self.bad_examples)
        return total


class Trainer:
    """One rank's training: set up in ``__init__``, then ``run``."""

    def __init__(self, cfg: Config, session: Session, plan: DataPlan, schedule: Schedule, location: str,
                 board=None, prepared: dict[str, Any] | None = None, faults: dict[str, Any] | None = None,
                 features_complete: bool = False):
        """``location`` is the run's directory in its storage (a path or URI); rank 0 keeps the run's files there
        and posts its progress to ``board`` (``medusa_ray.progress.Board``), from which the driver draws the bar.
        ``faults`` are test hooks (``medusa_ray.faults``)."""
        import torch

        self.cfg, self.session, self.plan, self.schedule, self.location = cfg, session, plan, schedule, location
        self.faults = faults or {}
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.collectives = Collectives(self.device)
        on_gpu = self.device.type == "cuda"

        ds_config = deepspeed_config(cfg, on_gpu)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.drafter = drafters.get(cfg.train.method)(cfg, prepared)
        self.store = FeatureStore(location, self.rank) if cfg.train.feature_cache is True else None
        self.base_loaded = self.store is None or not features_complete
        self.base, self.base_engine = frozen_base(cfg, self.device, torch.bfloat16 if on_gpu else torch.float32,
                                                  needed=self.base_loaded)
        module = self.drafter.build(self.base, self.device, drafter_dtype(ds_config))
        self.decoder = decoder_of(self.base)
        self.drafter.attach(self.decoder)
        self.features = FeatureSource(self.drafter, self.decoder if self.base_loaded else None, self.store,
                                      self.collectives, sharded=self.base_engine is not None)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)  # before ZeRO-3 partitions
        self.engine = init_engine(module, ds_config, schedule.warmup_steps, schedule.total_steps)

        self.progress = Progress()
        with session.resume_dir() as d:
            self.resumed = d is not None
            if self.resumed:
                load_path, client = self.engine.load_checkpoint(str(Path(d) / checkpoint.DEEPSPEED_DIR))
                if load_path is None:
                    raise RuntimeError(f"could not load the DeepSpeed checkpoint in {d}")
                self.progress = Progress(**client["medusa_ray"])
        self.resumed_from = self.progress.step

        self.run_dir = run_files.pull(location) if self.rank == 0 else run_files.local_dir(location)
        self.tracker = _open_tracker(cfg, self.run_dir) if self.rank == 0 else None
        if self.tracker is not None and not self.resumed:
            self.tracker.log_params({"world_size": self.world, "total_steps": schedule.total_steps,
                                     "zero_stage": self.zero_stage, "trainable_params": trainable,
                                     "train_rows": plan.train_rows, "val_rows": plan.val_rows})
        self.board = board if self.rank == 0 else None
        self.pad_id = _pad_id(self.base)
        self.reader = RowReader(plan.columns)
        self.validator = _Validator(cfg, plan, self.reader, self.rank, self.world, self.pad_id) \
            if plan.val_rows else None

        self.pending = StepStats(self.drafter.steps, self.drafter.width)
        self.metrics: dict[str, Any] = {}
        self.validation: dict[str, Any] = {}
        self.last_checkpoint = self.progress.step if self.resumed else -1
        self.run_tokens = self.run_seconds = 0.0  # this attempt's training steps (validation, checkpoints excluded)
        self.window_start = time.perf_counter()

    def finished(self) -> bool:
        p, s = self.progress, self.schedule
        if p.stopped_early or p.step >= s.total_steps:
            return True
        return s.max_epochs is not None and p.epoch >= s.max_epochs

    def run(self) -> dict[str, Any]:
        """Epochs until the schedule ends or validation stops improving; then ``finish``."""
        t = self.cfg.train
        while not self.finished():
            if self.store is not None:
                self.store.refresh()  # what every rank cached in the epochs before
            skip = self.progress.batches_in_epoch
            batches = plan_batches(epoch_units(self.plan, t.seed, self.progress.epoch, self.rank, self.world),
                                   self.reader, t.batch_size, skip)
            consumed_any = False
            while not self.finished():
                batch = next(batches, None)
                if batch is None and self.store is not None:
                    self.store.flush()  # before the collective below: the next epoch's ranks read it
                # Every rank must take the same number of steps (collectives); stop the epoch together.
                if not self.collectives.all_true(batch is not None):
                    break
                consumed_any = True
                self.micro_step(batch)
            if self.finished():
                break
            if not consumed_any and skip == 0:
                raise RuntimeError("the training data yielded no batches")
            self.progress.epoch += 1
            self.progress.batches_in_epoch = 0
        return self.finish()

    def micro_step(self, batch: dict[str, Any]) -> None:
        """One micro-batch; every ``grad_accum`` of them make an optimizer ``step``."""
        t = self.cfg.train
        if self.faults.get("train_record_rows_dir"):
            _record_rows(self.faults["train_record_rows_dir"], self.rank, self.progress.step + 1, batch)
        batch = tokenize_batch(batch, self.cfg.model, t.max_length)
        self.pending.add_bad(list(batch["bad"]))
        collated = _collate(batch, self.pad_id)
        features = self.features(batch["id"], collated, self.device)
        stats, tokens, self.lr = forward_backward(self.engine, features, collated, self.drafter, self.device)
        self.pending.add(stats, tokens, len(batch["input_ids"]), int(batch["truncated"].sum()),
                         int(batch["retokenized"].sum()))
        self.progress.batches_in_epoch += 1
        if self.engine.global_steps != self.progress.step:  # DeepSpeed stepped the optimizer
            self.step()

    def step(self) -> None:
        """After an optimizer step: sum the step's stats over ranks, log, validate and checkpoint when due."""
        p, s = self.progress, self.schedule
        p.step = self.engine.global_steps
        elapsed = time.perf_counter() - self.window_start
        total = self.pending.reduce(self.collectives)
        p.tokens += total.tokens
        p.rows += total.rows
        p.truncated += total.truncated
        p.retokenized += total.retokenized
        p.bad_rows += total.bad
        if self.rank == 0:
            p.bad_examples = (p.bad_examples + total.bad_examples)[:5]
        self.pending = StepStats(self.drafter.steps, self.drafter.width)
        self.metrics = self.drafter.metrics(total.per_position)
        self.metrics.update(lr=self.lr, tokens_per_s=total.tokens / max(elapsed, 1e-9), step=p.step, epoch=p.epoch)
        self.run_tokens, self.run_seconds = self.run_tokens + total.tokens, self.run_seconds + elapsed
        if p.bad_rows > s.max_bad_rows:
            raise BadRowError(f"train data: {p.bad_rows} of {self.plan.train_rows} rows cannot be trained on, "
                              f"more than train.max_bad_rows allows ({s.max_bad_rows}); e.g. "
                              + "; ".join(p.bad_examples[:3]))
        if self.rank == 0 and self.faults.get("train_fail_at_step") == p.step:
            _fail_once(self.run_dir, p.step)
        if self.rank == 0:
            _log_step(self.tracker, self.run_dir, self.metrics, self.cfg.train.log_every)

        # Every checkpoint carries a validation: export picks the best checkpoint by it.
        checkpoint_now = p.step % s.checkpoint_every == 0 or p.step >= s.total_steps
        if self.validator is not None and (p.step % s.val_every == 0 or checkpoint_now):
            self.validate()
        self._post()
        # Only checkpoints go to Ray Train: its controller takes one report per poll (2 s), so a report every
        # step would hold every step that long. Per-step metrics go to metrics.jsonl and the trackers above.
        if checkpoint_now or p.stopped_early:
            self.checkpoint()
        self.window_start = time.perf_counter()

    def validate(self) -> None:
        """Teacher-forced per-position top-1 on the validation rows, its expected acceptance, early stopping."""
        import torch

        p, s, drafter = self.progress, self.schedule, self.drafter
        stats = torch.zeros(drafter.steps, drafter.width, dtype=torch.float64)
        with torch.no_grad():
            for batch, counts, row_ids in self.validator.batches:
                features = self.features(row_ids, batch, self.device)
                _, batch_stats, _ = drafter.loss(self.engine, features, batch, self.device)
                if counts:
                    stats += batch_stats.detach().to("cpu", torch.float64)
        if self.store is not None:
            self.store.flush()
        summed = torch.tensor(self.collectives.sum(stats.flatten().tolist()), dtype=torch.float64).view_as(stats)
        per_step = drafter.metrics(summed)
        ea = expected_acceptance(drafter.chain(per_step))
        record_validation(p, s, ea)
        names = [drafter.name(k) for k in range(drafter.steps)]
        self.validation = {"step": p.step, "expected_acceptance": ea, "smoothed_expected_acceptance": p.smoothed,
                           "top1": drafter.top1(per_step),
                           "loss": [per_step[f"{name}_loss"] for name in names], "names": names,
                           "rows": self.validator.rows, "best_step": p.best_step, "best_expected_acceptance": p.best_val}
        if self.rank == 0:
            _log_validation(self.tracker, self.run_dir, self.validation)

    def checkpoint(self) -> None:
        """Every rank writes its DeepSpeed shard and joins the weight gather; rank 0 writes the meta and the
        weights; Ray Train merges the ranks' directories into one checkpoint."""
        p, session = self.progress, self.session
        tmp = Path(tempfile.mkdtemp(prefix=f"medusa-ckpt-r{self.rank}-"))
        try:
            ds_dir = tmp / checkpoint.DEEPSPEED_DIR
            ds_dir.mkdir()  # DeepSpeed creates it on rank 0 only, assuming a shared filesystem
            self.engine.save_checkpoint(str(ds_dir), tag=f"global_step{p.step}", client_state={"medusa_ray": asdict(p)})
            weights = full_weights(self.engine, self.drafter.trainable)  # a collective under ZeRO 1-3
            (tmp / checkpoint.WORKERS_DIR).mkdir()
            (tmp / checkpoint.WORKERS_DIR / f"rank-{self.rank:05d}.json").write_text(json.dumps(
                {"rank": self.rank, "node_id": _node_id(), "device": str(session.device)}))
            if self.rank == 0:
                checkpoint.write(tmp, self._meta(), weights)
            reported = dict(self.metrics)
            if self.validation:
                reported["val_expected_acceptance"] = self.validation["expected_acceptance"]
                reported["val_smoothed_expected_acceptance"] = self.validation["smoothed_expected_acceptance"]
            session.report(reported, tmp, p.step)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.last_checkpoint = p.step
        if self.rank == 0:
            run_files.push(self.location)

    def _meta(self) -> checkpoint.Meta:
        p, cfg, module = self.progress, self.cfg, self.engine.module
        text = self.base.config.get_text_config() if hasattr(self.base.config, "get_text_config") \
            else self.base.config
        return checkpoint.Meta(
            method=self.drafter.method, global_step=p.step, base_model=cfg.model,
            hidden_size=int(text.hidden_size), vocab_size=int(text.vocab_size), zero_stage=self.zero_stage,
            world_size=self.world, shape=self.drafter.meta(module), config=cfg.to_dict(), metrics=self.metrics,
            validation=self.validation or None,
            data={"rows": p.rows, "tokens": p.tokens, "source": cfg.train_data, "truncated": p.truncated,
                  "retokenized": p.retokenized, "epoch": p.epoch, "bad_rows": p.bad_rows,
                  "bad_examples": p.bad_examples},
            base_architectures=list(getattr(self.base.config, "architectures", None) or []))

    def finish(self) -> dict[str, Any]:
        """The final state validated and saved (if the epochs ran out before the planned steps), the tracker's
        summary, the plots; what the driver reads back."""
        p, s = self.progress, self.schedule
        if not p.stop_reason:
            p.stop_reason = (f"the planned {s.total_steps} steps" if p.step >= s.total_steps else
                             f"{p.epoch} epochs (train.max_epochs)" if s.max_epochs is not None else "")
        if p.step > 0 and self.last_checkpoint != p.step:
            if self.validator is not None and self.validation.get("step") != p.step:
                self.validate()
            self.checkpoint()
        if self.store is not None:
            self.store.flush()
        if self.tracker is not None:
            summary = {**self.metrics, "rows": p.rows, "tokens": p.tokens, "truncated": p.truncated,
                       "bad_rows": p.bad_rows}
            summary.update({f"val_{k}": v for k, v in _flat_validation(self.validation).items()})
            self.tracker.log_summary(summary)
            self.tracker.close()
        plots = _plots(self.run_dir) if self.rank == 0 else []
        if self.rank == 0:
            run_files.push(self.location)
        return {"resumed_from": self.resumed_from, "progress": asdict(p), "metrics": self.metrics,
                "validation": self.validation, "plots": [str(x) for x in plots],
                "peak_memory_mib": _peak_memory_mib(self.device), "base_loaded": self.base_loaded,
                "base_sharded": self.base_engine is not None,
                "features": {"computed_rows": self.features.misses, "cached_rows": self.features.hits,
                             "written_bytes": self.store.written_bytes if self.store is not None else 0},
                "tokens_per_s": self.run_tokens / self.run_seconds if self.run_seconds else None}

    def _post(self) -> None:
        if self.board is not None:  # fire and forget: the driver reads the latest whenever it draws
            self.board.post.remote({"step": self.metrics["step"], "total": self.schedule.total_steps,
                                    "loss": self.metrics["loss"],
                                    "expected_acceptance": self.validation.get("expected_acceptance")})


def _peak_memory_mib(device) -> float:
    """This worker's peak: GPU memory allocated on a GPU, the process's resident memory on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # this process image's own peak; ru_maxrss also counts what a parent held when it forked this process
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _collate(batch: dict[str, Any], pad_id: int):
    if len(batch["input_ids"]) == 0:
        # Every row of this micro-batch was skipped; the step still runs (ranks step together, and ZeRO
        # needs every rank in backward), on one padding token with no labels: zero loss, zero gradients.
        return collate([[pad_id]], [[IGNORE_INDEX]], pad_id)
    return collate(batch["input_ids"], batch["labels"], pad_id)


class _Validator:
    """This rank's share of the validation rows, tokenized once, in the same number of batches on every rank
    (ZeRO-3 gathers parameters inside forward, so every rank must run every forward)."""

    def __init__(self, cfg: Config, plan: DataPlan, reader, rank: int, world: int, pad_id: int):
        t = cfg.train
        rows = validation_rows(plan, reader)
        mine = rows[rank::world]
        per_rank = math.ceil(len(rows) / world)
        self.num_batches = math.ceil(per_rank / t.batch_size)
        tokenized = tokenize_batch(to_columns(mine or rows[:1]), cfg.model, t.max_length)
        ids, labels, row_ids = list(tokenized["input_ids"]), list(tokenized["labels"]), tokenized["id"]
        self.batches = []
        for i in range(self.num_batches):
            chunk = slice(i * t.batch_size, (i + 1) * t.batch_size)
            if mine and ids[chunk]:
                self.batches.append((collate(ids[chunk], labels[chunk], pad_id), True, row_ids[chunk]))
            else:  # nothing left on this rank: a forward that counts for nothing
                self.batches.append((collate([[pad_id]], [[IGNORE_INDEX]], pad_id), False, []))
        self.rows = len(rows)


def _flat_validation(validation: dict[str, Any]) -> dict[str, float]:
    if not validation:
        return {}
    out = {"expected_acceptance": validation["expected_acceptance"]}
    for name, top1, loss in zip(validation["names"], validation["top1"], validation["loss"]):
        out[f"{name}_top1"] = top1
        out[f"{name}_loss"] = loss
    return out


def _log_validation(tracker, run_dir: Path, validation: dict[str, Any]) -> None:
    with open(run_dir / "validation.jsonl", "a") as f:
        f.write(json.dumps(validation) + "\n")
    if tracker is not None:
        tracker.log_metrics(_flat_validation(validation), step=validation["step"], prefix="val/")


def full_weights(engine, keep=lambda name: True) -> dict[str, Any]:
    """Every drafter parameter ``keep`` names, in full fp32, whatever the ZeRO stage: the optimizer's fp32 master
    copy where DeepSpeed keeps one (partitioned under ZeRO 1-3, so all ranks must call this), else the parameter
    itself; and the drafter's persistent buffers (EAGLE-3's vocabulary maps), as they are."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # a collective: every rank, every parameter
        if keep(name):
            weights[name] = (param if full is None else full).detach().to("cpu", dtype=torch.float32).contiguous()
    persistent = engine.module.state_dict().keys()
    for name, buffer in engine.module.named_buffers():
        if keep(name) and name in persistent:
            weights[name] = buffer.detach().to("cpu").contiguous()
    return weights


def _plots(run_dir: Path) -> list[Path]:
    """The run's PNGs from its metrics and validation files (whichever exist)."""
    from medusa_ray.train.plots import plot_head_losses, plot_validation

    written = []
    for source, plot, png in (("metrics.jsonl", plot_head_losses, "head_losses.png"),
                              ("validation.jsonl", plot_validation, "validation.png")):
        if (run_dir / source).is_file():
            try:
                written.append(plot(run_dir / source, run_dir / png))
            except Exception as exc:  # noqa: BLE001 - a plot never fails a finished run
                log.warning("could not plot %s: %s", source, exc)
    return written


def _record_rows(directory: str, rank: int, step: int, batch: dict[str, Any]) -> None:
    with open(Path(directory) / f"rank-{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "ids": [str(i) for i in batch["id"]]}) + "\n")


def _fail_once(run_dir: Path, step: int) -> None:
    """Fault ``train_fail_at_step``: raise the first time any attempt of this run reaches ``step`` (a marker in
    the run dir survives restarts)."""
    marker = run_dir / FAIL_MARKER.format(step=step)
    if marker.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    raise RuntimeError(f"fault train_fail_at_step={step}: injected failure (test hook)")


def _log_step(tracker, run_dir: Path, metrics: dict[str, Any], log_every: int) -> None:
    step = metrics["step"]
    if step % log_every:
        return
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)


def _open_tracker(cfg: Config, run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        from medusa_ray.tracking import open_tracker
    except ImportError:  # a tracker's package missing from the image never costs a training run
        return None
    try:
        return open_tracker(cfg, str(run_dir))
    except Exception as exc:  # noqa: BLE001 - tracking never costs a training run
        log.warning("tracking disabled: %s", exc)
        return None


def _node_id() -> str | None:
    from medusa_ray.cluster import node_id

    return node_id()


def _pad_id(base) -> int:
    pad = getattr(base.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(base.config, "eos_token_id", None)
        if isinstance(pad, list):
            pad = pad[0]
    return int(pad or 0)
