"""The training loop that runs on every Ray Train worker: frozen base + MedusaHeads under DeepSpeed.

Only the heads go to ``deepspeed.initialize``, so the optimizer, ZeRO partitioning and the checkpoint
hold nothing but head parameters, under the heads' own state_dict keys. The base runs its decoder
only (no lm_head, no logits) under ``no_grad`` to produce the last hidden state.
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

from medusa_ray.config import Config
from medusa_ray.data.chat import IGNORE_INDEX, BadRowError
from medusa_ray.train import checkpoints
from medusa_ray.train.data import collate, tokenize_batch
from medusa_ray.train.plan import DataPlan, RowReader, epoch_units, to_columns, validation_rows
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
    bad_rows: int = 0  # rows skipped because they cannot be templated or masked (all ranks)
    bad_examples: list = field(default_factory=list)  # the first few, "id=...: reason"
    best_val: float = -1.0  # best validation expected acceptance so far
    best_step: int = 0
    since_best: int = 0  # validations without improvement
    stopped_early: bool = False


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
    max_epochs: int | None = None
    max_bad_rows: int = 0
    """More skipped rows than this fail the run."""



def load_base(cfg: Config, device, dtype):
    """The frozen base: every parameter requires_grad=False, in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    base.requires_grad_(False)
    base.eval()
    return base.to(device)


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
        # bf16 heads only where ZeRO keeps fp32 master weights and optimizer states (stages 1-3); at stage 0
        # DeepSpeed would update bf16 weights directly, so the heads (small next to the base) stay fp32 there.
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


def heads_dtype(ds_config: dict[str, Any]):
    """The heads' parameter dtype that the DeepSpeed config trains: bf16/fp16 when it enables them, else fp32."""
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


def init_engine(heads, ds_config: dict[str, Any], warmup_steps: int = 0, total_steps: int = 1):
    """DeepSpeed engine over the heads only; our warmup + cosine schedule unless the config brings one."""
    import deepspeed
    import torch

    from medusa_ray.cluster import verbose

    if not verbose():
        # DeepSpeed narrates its config and every save at INFO on stdout through a handler of its own: hand its
        # records to this worker's logging, where INFO goes to the log file and warnings to the console.
        deepspeed.utils.logger.handlers.clear()
        deepspeed.utils.logger.propagate = True
    params = [p for p in heads.parameters() if p.requires_grad]
    scheduler = None
    if "scheduler" not in ds_config:
        factor = lr_lambda(warmup_steps, total_steps)

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    engine, _, _, _ = deepspeed.initialize(model=heads, model_parameters=params, config=ds_config,
                                           lr_scheduler=scheduler)
    return engine


def forward_backward(engine, decoder, batch, cfg: Config, device, drafter=None):
    """One micro-step: the drafter's loss (Medusa heads unless told), DeepSpeed backward + step."""
    from medusa_ray.train.drafters import Medusa

    loss, stats, mask = (drafter or Medusa(cfg)).loss(engine, decoder, batch, device)
    engine.backward(loss)
    lr = float(engine.get_lr()[0])  # the rate this update uses (after step() it is the next one's)
    engine.step()
    return stats, int(mask.sum()), lr


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
                         checkpoint_dir_name=checkpoints.checkpoint_dir_name(step))


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
        target = self.checkpoint_root / checkpoints.checkpoint_dir_name(step)
        shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
        if target not in self.checkpoints:
            self.checkpoints.append(target)


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train ``train_loop_per_worker``."""
    from medusa_ray import logs

    logs.worker_setup()  # Ray Train gave this worker's root logger a console handler of its own
    return run_loop(Config.model_validate(config["cfg"]), RaySession(), DataPlan.from_dict(config["plan"]),
                    Schedule(**config["schedule"]), config["run_dir"], board=config.get("board"),
                    vocab=config.get("vocab"), faults=config.get("faults"))


def run_loop(cfg: Config, session: Session, plan: DataPlan, schedule: Schedule, location: str,
             board=None, vocab: dict[str, Any] | None = None, faults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the heads on ``plan``'s rows for ``schedule``; validate, checkpoint, stop early.

    ``location`` is the run's directory in its storage (a path or URI); rank 0 keeps the run's files there and
    posts its progress to ``board`` (``medusa_ray.progress.Board``), from which the driver draws the bar.
    """
    import torch

    from medusa_ray.train import run_files

    t = cfg.train
    faults = faults or {}  # test hooks (medusa_ray.faults)
    rank, world, device = session.rank, session.world, session.device
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    collectives = Collectives(device)

    from medusa_ray.train.drafters import drafter as make_drafter

    ds_config = deepspeed_config(cfg, on_gpu)
    drafter = make_drafter(cfg, vocab)
    base = load_base(cfg, device, dtype)
    heads = drafter.build(base, device, heads_dtype(ds_config))
    decoder = decoder_of(base)
    drafter.attach(decoder)
    trainable = sum(p.numel() for p in heads.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    engine = init_engine(heads, ds_config, schedule.warmup_steps, schedule.total_steps)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    progress = Progress()
    with session.resume_dir() as d:
        resumed = d is not None
        if resumed:
            load_path, client = engine.load_checkpoint(str(Path(d) / checkpoints.DEEPSPEED_DIR))
            if load_path is None:
                raise RuntimeError(f"could not load the DeepSpeed checkpoint in {d}")
            progress = Progress(**client["medusa_ray"])
    resumed_from = progress.step

    run_dir = run_files.pull(location) if rank == 0 else run_files.local_dir(location)
    tracker = _open_tracker(cfg, run_dir) if rank == 0 else None
    if tracker is not None and not resumed:
        tracker.log_params({"world_size": world, "total_steps": schedule.total_steps, "zero_stage": zero_stage,
                            "trainable_params": trainable, "train_rows": plan.train_rows,
                            "val_rows": plan.val_rows})
    board = board if rank == 0 else None
    pad_id = _pad_id(base)
    reader = RowReader(plan.columns)
    validator = _Validator(cfg, plan, reader, rank, world, pad_id) if plan.val_rows else None

    acc = torch.zeros(drafter.steps, drafter.width, dtype=torch.float64)
    acc_tokens = acc_rows = acc_trunc = acc_bad = 0
    bad_here: list[str] = []
    last_ckpt = progress.step if resumed else -1
    metrics: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    window_start = time.perf_counter()
    run_tokens = run_seconds = 0.0  # this attempt's training steps (validation and checkpoints excluded)

    def finished() -> bool:
        if progress.stopped_early or progress.step >= schedule.total_steps:
            return True
        return schedule.max_epochs is not None and progress.epoch >= schedule.max_epochs

    while not finished():
        skip = progress.batches_in_epoch
        batches = plan_batches(epoch_units(plan, t.seed, progress.epoch, rank, world), reader, t.batch_size, skip)
        consumed_any = False
        while not finished():
            batch = next(batches, None)
            # Every rank must take the same number of steps (collectives); stop the epoch together.
            if not collectives.all_true(batch is not None):
                break
            consumed_any = True
            if faults.get("train_record_rows_dir"):
                _record_rows(faults["train_record_rows_dir"], rank, progress.step + 1, batch)
            batch = tokenize_batch(batch, cfg.model, t.max_length)
            acc_bad += len(batch["bad"])
            bad_here += [b for b in batch["bad"] if len(bad_here) < 5]
            stats, tokens, lr = forward_backward(engine, decoder, _collate(batch, pad_id), cfg, device, drafter)
            acc += stats.detach().to("cpu", torch.float64)
            acc_tokens += tokens
            acc_rows += len(batch["input_ids"])
            acc_trunc += int(batch["truncated"].sum())
            progress.batches_in_epoch += 1
            if engine.global_steps == progress.step:
                continue  # still accumulating gradients

            # An optimizer step happened.
            progress.step = engine.global_steps
            summed = collectives.sum(acc.flatten().tolist() + [acc_tokens, acc_rows, acc_trunc, acc_bad])
            elapsed = time.perf_counter() - window_start
            stats_all = torch.tensor(summed[:-4], dtype=torch.float64).view_as(acc)
            progress.tokens += int(summed[-4])
            progress.rows += int(summed[-3])
            progress.truncated += int(summed[-2])
            progress.bad_rows += int(summed[-1])
            if rank == 0:
                progress.bad_examples = (progress.bad_examples + bad_here)[:5]
            metrics = drafter.metrics(stats_all)
            metrics.update(lr=lr, tokens_per_s=summed[-4] / max(elapsed, 1e-9), step=progress.step)
            run_tokens, run_seconds = run_tokens + summed[-4], run_seconds + elapsed
            acc.zero_()
            acc_tokens = acc_rows = acc_trunc = acc_bad = 0
            bad_here = []
            if progress.bad_rows > schedule.max_bad_rows:
                raise BadRowError(f"train data: {progress.bad_rows} of {plan.train_rows} rows cannot be trained on, "
                                  f"more than train.max_bad_rows allows ({schedule.max_bad_rows}); e.g. "
                                  + "; ".join(progress.bad_examples[:3]))

            if rank == 0 and faults.get("train_fail_at_step") == progress.step:
                _fail_once(run_dir, progress.step)
            if rank == 0:
                _log_step(tracker, run_dir, metrics, t.log_every)

            # Every checkpoint carries a validation: export picks the best checkpoint by it.
            checkpoint_now = progress.step % schedule.checkpoint_every == 0 or progress.step >= schedule.total_steps
            if validator is not None and (progress.step % schedule.val_every == 0 or checkpoint_now):
                validation = _validate(validator, engine, decoder, drafter, device, collectives, progress, schedule)
                if rank == 0:
                    _log_validation(tracker, run_dir, validation)
            _post(board, schedule, metrics, validation)
            if checkpoint_now or progress.stopped_early:
                _report_with_checkpoint(session, engine, cfg, progress, metrics, validation, zero_stage, base, drafter)
                last_ckpt = progress.step
                if rank == 0:
                    run_files.push(location)
            elif progress.step % t.log_every == 0:
                session.report(metrics, None, progress.step)
            window_start = time.perf_counter()
        if finished():
            break
        if not consumed_any and skip == 0:
            raise RuntimeError("the training data yielded no batches")
        progress.epoch += 1
        progress.batches_in_epoch = 0

    if progress.step > 0 and last_ckpt != progress.step:
        # The epochs ran out before the planned step count: the final state still gets validated and saved.
        if validator is not None and validation.get("step") != progress.step:
            validation = _validate(validator, engine, decoder, drafter, device, collectives, progress, schedule)
            if rank == 0:
                _log_validation(tracker, run_dir, validation)
        _report_with_checkpoint(session, engine, cfg, progress, metrics, validation, zero_stage, base, drafter)
    if tracker is not None:
        summary = {**metrics, "rows": progress.rows, "tokens": progress.tokens, "truncated": progress.truncated,
                   "bad_rows": progress.bad_rows}
        summary.update({f"val_{k}": v for k, v in _flat_validation(validation).items()})
        tracker.log_summary(summary)
        tracker.close()
    plots = _plots(run_dir) if rank == 0 else []
    if rank == 0:
        run_files.push(location)
    return {"resumed_from": resumed_from, "progress": asdict(progress), "metrics": metrics,
            "validation": validation, "plots": [str(p) for p in plots], "peak_memory_mib": _peak_memory_mib(device),
            "tokens_per_s": run_tokens / run_seconds if run_seconds else None}


def _peak_memory_mib(device) -> float:
    """This worker's peak: GPU memory allocated on a GPU, the process's resident memory on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
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
        import math

        t = cfg.train
        rows = validation_rows(plan, reader)
        mine = rows[rank::world]
        per_rank = math.ceil(len(rows) / world)
        self.num_batches = math.ceil(per_rank / t.batch_size)
        tokenized = tokenize_batch(to_columns(mine or rows[:1]), cfg.model, t.max_length)
        ids, labels = list(tokenized["input_ids"]), list(tokenized["labels"])
        self.batches = []
        for i in range(self.num_batches):
            chunk = slice(i * t.batch_size, (i + 1) * t.batch_size)
            if mine and ids[chunk]:
                self.batches.append((collate(ids[chunk], labels[chunk], pad_id), True))
            else:  # nothing left on this rank: a forward that counts for nothing
                self.batches.append((collate([[pad_id]], [[IGNORE_INDEX]], pad_id), False))
        self.rows = len(rows)


def _validate(validator: _Validator, engine, decoder, drafter, device, collectives: Collectives,
              progress: Progress, schedule: Schedule) -> dict[str, Any]:
    """Teacher-forced per-step top-1 on the validation rows, its expected acceptance, early-stopping state."""
    import torch

    stats = torch.zeros(drafter.steps, drafter.width, dtype=torch.float64)
    with torch.no_grad():
        for batch, counts in validator.batches:
            _, batch_stats, _ = drafter.loss(engine, decoder, batch, device)
            if counts:
                stats += batch_stats.detach().to("cpu", torch.float64)
    summed = torch.tensor(collectives.sum(stats.flatten().tolist()), dtype=torch.float64).view_as(stats)
    from medusa_ray.train.drafters import expected_acceptance

    per_step = drafter.metrics(summed)
    ea = expected_acceptance(drafter.chain(per_step))
    if ea > progress.best_val:
        progress.best_val, progress.best_step, progress.since_best = ea, progress.step, 0
    else:
        progress.since_best += 1
    if (schedule.early_stopping and progress.step >= schedule.min_steps
            and progress.since_best >= schedule.patience):
        progress.stopped_early = True
    names = [drafter.name(k) for k in range(drafter.steps)]
    return {"step": progress.step, "expected_acceptance": ea, "top1": drafter.top1(per_step),
            "loss": [per_step[f"{name}_loss"] for name in names], "names": names,
            "rows": validator.rows, "best_step": progress.best_step, "best_expected_acceptance": progress.best_val}


def _flat_validation(validation: dict[str, Any]) -> dict[str, float]:
    if not validation:
        return {}
    out = {"expected_acceptance": validation["expected_acceptance"]}
    names = validation.get("names") or [f"medusa{k}" for k in range(len(validation["top1"]))]
    for name, top1, loss in zip(names, validation["top1"], validation["loss"]):
        out[f"{name}_top1"] = top1
        out[f"{name}_loss"] = loss
    return out


def _log_validation(tracker, run_dir: Path, validation: dict[str, Any]) -> None:
    with open(run_dir / "validation.jsonl", "a") as f:
        f.write(json.dumps(validation) + "\n")
    if tracker is not None:
        tracker.log_metrics(_flat_validation(validation), step=validation["step"], prefix="val/")


def full_head_weights(engine, keep=lambda name: True) -> dict[str, Any]:
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


def _report_with_checkpoint(session: Session, engine, cfg: Config, progress: Progress, metrics, validation,
                            zero_stage, base, drafter) -> None:
    """Every rank writes its DeepSpeed shard; Ray Train merges the ranks' directories into one checkpoint."""
    rank, world = session.rank, session.world
    tmp = Path(tempfile.mkdtemp(prefix=f"medusa-ckpt-r{rank}-"))
    try:
        ds_dir = tmp / checkpoints.DEEPSPEED_DIR
        ds_dir.mkdir()  # DeepSpeed creates it on rank 0 only, assuming a shared filesystem
        engine.save_checkpoint(str(ds_dir), tag=f"global_step{progress.step}", client_state={"medusa_ray": asdict(progress)})
        weights = full_head_weights(engine, drafter.trainable)  # a collective under ZeRO 1-3: every rank
        if rank == 0:
            from safetensors.torch import save_file

            save_file(weights, str(tmp / checkpoints.HEADS_FILE))
        (tmp / checkpoints.WORKERS_DIR).mkdir()
        (tmp / checkpoints.WORKERS_DIR / f"rank-{rank:05d}.json").write_text(json.dumps(
            {"rank": rank, "node_id": _node_id(), "device": str(session.device)}))
        if rank == 0:
            meta = {
                "format": checkpoints.META_FORMAT,
                "base_model": cfg.model,
                **drafter.meta(engine.module),
                "global_step": progress.step,
                "zero_stage": zero_stage,
                "world_size": world,
                "config": cfg.to_dict(),
                "metrics": metrics,
                "validation": validation or None,
                "data": {"rows": progress.rows, "tokens": progress.tokens, "source": cfg.train_data,
                         "truncated": progress.truncated, "epoch": progress.epoch, "bad_rows": progress.bad_rows,
                         "bad_examples": progress.bad_examples},
                "base_architectures": list(getattr(base.config, "architectures", None) or []),
            }
            (tmp / checkpoints.META_FILE).write_text(json.dumps(meta, indent=2))
        reported = dict(metrics)
        if validation:
            reported["val_expected_acceptance"] = validation["expected_acceptance"]
        session.report(reported, tmp, progress.step)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Test hook: raise the first time any attempt of this run reaches ``step`` (a marker survives restarts)."""
    marker = run_dir / FAIL_MARKER.format(step=step)
    if marker.exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    raise RuntimeError(f"fault train_fail_at_step={step}: injected failure (test hook)")


def _post(board, schedule: Schedule, metrics: dict[str, Any], validation: dict[str, Any]) -> None:
    if board is not None:  # fire and forget: the driver reads the latest whenever it draws
        board.post.remote({"step": metrics["step"], "total": schedule.total_steps, "loss": metrics["loss"],
                           "expected_acceptance": validation.get("expected_acceptance")})


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
    except ImportError:
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
