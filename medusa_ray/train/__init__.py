"""train: a drafter (``train.method``) on the frozen base model with Ray Train + DeepSpeed.

``run(cfg)`` checks everything it can on the driver (data, base model, DeepSpeed JSON, an existing
checkpoint of the same run), then starts a ``TorchTrainer`` whose workers run ``worker.train_loop``, and
returns a ``TrainResult`` (``summary()`` is the table the CLI prints). A re-run with the same
``train.run_name`` and ``train.storage_path`` continues from the run's latest checkpoint (Ray Train V2
restores it from the run directory).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_ray import drafters, faults, parquet, progress
from medusa_ray.checkpoint import (
    best_checkpoint,
    find_latest_checkpoint,
    run_checkpoints,
    worker_nodes,
)
from medusa_ray.cluster import torch_backend
from medusa_ray.config import Config
from medusa_ray.errors import UserError
from medusa_ray.locks import hold
from medusa_ray.logs import verbose
from medusa_ray.paths import check_local_model, join
from medusa_ray.train import run_files
from medusa_ray.train.data import check_schema, list_data_files
from medusa_ray.train.plan import make_plan
from medusa_ray.train.worker import Schedule, prepare_drafter, train_loop
from medusa_ray.writable import check_writable

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "run", "run_location", "local_run_dir", "track_summary", "plan_schedule",
           "find_latest_checkpoint"]


@dataclass
class TrainResult:
    checkpoint: str
    """The final checkpoint: a local path, or a URI on object storage."""
    global_step: int
    metrics: dict[str, Any]
    resumed_from: int = 0
    """Global step the last training attempt started from (0: from scratch)."""
    run_dir: str | None = None
    """``<storage_path>/<run_name>``: checkpoints, tracker logs, metrics.jsonl, plots."""
    plot: str | None = None
    """The per-head loss and top-1 curves (``head_losses.png``)."""
    plots: list[str] = field(default_factory=list)
    """Every PNG of the run: ``head_losses.png``, and ``validation.png`` when there is a validation split."""
    data: dict[str, Any] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    """Ray node ids the training workers ran on."""
    validation: dict[str, Any] = field(default_factory=dict)
    """The final validation: ``expected_acceptance``, per-head ``top1`` and ``loss``, ``best_step``..."""
    best_checkpoint: str | None = None
    """The checkpoint with the best validation expected acceptance (what ``export`` picks)."""
    best_validation: dict[str, Any] = field(default_factory=dict)
    """That checkpoint's validation."""
    stopped_early: bool = False
    stop_reason: str = ""
    """Why training ended: the stop rule (with the best step), the planned steps, or the epochs."""
    tokens_per_s: float | None = None
    """Training throughput of the last attempt, all workers, over its optimizer steps (validation excluded)."""
    peak_memory_mib: float | None = None
    """Rank 0's peak during training: GPU memory allocated on a GPU, resident memory on CPU."""
    method: str = "medusa"
    train_cfg: dict[str, Any] = field(default_factory=dict, repr=False)
    """The ``train`` section the run used (the summary's labels and loss weights)."""

    def _positions(self) -> list[str]:
        cfg = Config.model_validate({"train": self.train_cfg})
        drafter = drafters.get(self.method)
        return [drafter(cfg).name(k) for k in range(drafter.num_positions(cfg.train))]

    def top1(self) -> list[float]:
        """Per draft position: top-1 on the best checkpoint's validation rows, else the last training batch's."""
        if self.best_validation.get("top1"):
            return list(self.best_validation["top1"])
        return [float(self.metrics.get(f"{name}_top1", float("nan"))) for name in self._positions()]

    def summary(self) -> str:
        """Per draft position: the last batch's loss and accuracy, and (with a validation split) held-out top-1;
        the checkpoints and plots."""
        drafter = drafters.get(self.method)
        t = Config.model_validate({"train": self.train_cfg}).train
        cols = drafter.summary_columns(t)
        val_top1 = self.validation.get("top1") or []
        head = f"{drafter.position:>4}  {'predicts':>8}  {'weight':>6}  {'loss':>7}  " + \
            "  ".join(f"{c:>6}" for c in cols)
        lines = [head + ("  val top1" if val_top1 else "")]
        for k, name in enumerate(self._positions()):
            loss = self.metrics.get(f"{name}_loss", float("nan"))
            accs = "  ".join(f"{self.metrics.get(f'{name}_{c}', float('nan')):>6.3f}" for c in cols)
            val = f"  {val_top1[k]:>8.3f}" if k < len(val_top1) else ""
            lines.append(f"{k:>4}  {'t+' + str(k + 2):>8}  {t.head_decay**k:>6.3f}  {loss:>7.4f}  {accs}{val}")
        stop = " (stopped early)" if self.stopped_early else ""
        out = [f"trained {drafter.title}: step {self.global_step}{stop}, loss "
               f"{self.metrics.get('loss', float('nan')):.4f}, {self.metrics.get('tokens_per_s', float('nan')):.0f} "
               "tokens/s", *lines]
        v = self.validation
        if v:
            out.append(f"validation expected acceptance {v['expected_acceptance']:.3f} on {v['rows']} held-back "
                       f"conversations (best {v['best_expected_acceptance']:.3f} smoothed, at step {v['best_step']}; "
                       "an estimate of vLLM's acceptance length)")
        if self.stop_reason:
            curve = next((p for p in self.plots if p.endswith("validation.png")), None)
            out.append(f"stopped after {self.stop_reason}" + (f" (the curve: {curve})" if curve else ""))
        if self.data.get("retokenized"):
            out.append(f"{self.data['retokenized']} of {self.data.get('rows', '?')} rows read were trained on "
                       "re-tokenized text: their replies came without the generated token ids (distilled before "
                       "0.2, or by an endpoint that does not return them)")
        if self.data.get("bad_rows"):
            out.append(f"skipped {self.data['bad_rows']} rows that cannot be trained on, e.g. "
                       + "; ".join(self.data.get("bad_examples", [])[:3]))
        out.append(f"checkpoint: {self.checkpoint}")
        if self.best_checkpoint and self.best_checkpoint != self.checkpoint:
            out.append(f"best checkpoint: {self.best_checkpoint} (what export picks)")
        out += [f"plot: {plot}" for plot in self.plots]
        return "\n".join(out)


def run(cfg: Config) -> TrainResult:
    """Train the drafter; return the final checkpoint, its global step and its metrics."""

    cfg = _resolve_paths(cfg)
    if len(cfg.methods) > 1:
        raise UserError(f"train.method={cfg.methods}: `train` trains one drafter per run (set train.method, "
                        "and train.run_name for each), or run `pipeline`, which trains and compares them all")
    cfg.train.method = cfg.methods[0]
    t = cfg.train
    check_local_model(cfg.model)
    files = list_data_files(cfg.train_data)
    _columns(files)  # every shard readable, or one line naming it
    check_schema(files)
    _check_rows_model(files, cfg.model, cfg.train_data)
    hidden_size, vocab_size = _base_dims(cfg.model)
    if t.deepspeed_config:
        _check_deepspeed_json(t.deepspeed_config)
    location = run_files.run_location(t.storage_path, t.run_name)
    check_writable(t.storage_path, "train.storage_path")
    # One writer per run: two trainings of one run would interleave their checkpoints and resume from either.
    with hold(location, f"training run {t.run_name!r}"):
        return _train(cfg, files, hidden_size, vocab_size, location)


def _train(cfg: Config, files: list[str], hidden_size: int, vocab_size: int, location: str) -> TrainResult:
    from medusa_ray.cluster import init_ray

    t = cfg.train
    _check_resumable(cfg, hidden_size, vocab_size)

    plan = make_plan(files, t.seed, t.val_fraction, t.val_min_rows, t.val_max_rows, world=t.num_workers,
                     val_min_tokens=t.val_min_tokens)
    if plan.train_rows == 0:
        raise UserError(f"train data {cfg.train_data} has no rows")
    if plan.duplicates:
        log.warning("train data %s: %d rows repeat an earlier row's id and are dropped", cfg.train_data,
                    plan.duplicates)
    schedule = plan_schedule(t, plan.train_rows)
    init_ray(cfg.ray)
    from medusa_ray.cluster import resolve_accelerator, run_task

    use_gpu = t.use_gpu if t.use_gpu != "auto" else resolve_accelerator("auto", "train.use_gpu") == "gpu"
    t.shard_base = _resolve_shard_base(cfg, bool(use_gpu))
    how = (f"{schedule.total_steps} steps" if not schedule.early_stopping else
           f"up to {schedule.total_steps} steps, stopping when validation stops improving")
    drafter = drafters.get(t.method)
    prepared = None
    if drafter.needs_preparation:  # a pass over every training row: a worker's job, not the driver's

        prepared = run_task(prepare_drafter, cfg.to_dict(), plan.to_dict(), name=f"medusa-ray-{t.method}-prepare")
    print(f"training {drafter.describe_training(t, prepared)} on {plan.train_rows} conversations ({plan.val_rows} "
          f"held back for validation), {how}, {t.num_workers} worker(s), ZeRO {t.zero_stage}"
          f"{', the base sharded across them' if t.shard_base else ''}", flush=True)
    t.feature_cache, complete = _feature_cache(cfg, plan, schedule, location, bool(use_gpu), hidden_size, prepared)
    return _fit(cfg, plan, schedule, location, use_gpu, prepared, complete)


def _feature_cache(cfg: Config, plan, schedule: Schedule, location: str, use_gpu: bool, hidden_size: int,
                   prepared) -> tuple[bool, bool]:
    """Decide ``train.feature_cache`` (``auto``: more than one planned pass, and at most ``feature_cache_max_gb``),
    say so in one line with its size, and ready the run's cache (kept if it was made for this run's features).
    Returns (cache on, it already holds every planned row: the workers need not load the base)."""
    from medusa_ray.train import features

    t = cfg.train
    drafter = drafters.get(t.method)
    rows = plan.train_rows + plan.val_rows
    width = 2 if use_gpu else 4  # the base's dtype: bf16 on GPUs, fp32 on CPU
    layers = drafter.feature_layers(t)
    size = rows * t.max_length * hidden_size * width * layers
    passes = schedule.total_steps * t.num_workers * t.batch_size * t.grad_accum / max(plan.train_rows, 1)
    on = t.feature_cache if t.feature_cache != "auto" else passes > 1 and size <= t.feature_cache_max_gb * 2**30
    sizing = (f"at most {size / 2**30:.2f} GiB ({rows} rows x {t.max_length} tokens x {hidden_size} hidden x "
              f"{width} bytes x {layers} layer{'s' if layers > 1 else ''})")
    if not on:
        why = "train.feature_cache=false" if t.feature_cache is False else (
            "one pass planned" if passes <= 1 else f"over train.feature_cache_max_gb={t.feature_cache_max_gb:g}")
        print(f"feature cache off ({why}): the base runs on every step; it would be {sizing}", flush=True)
        return False, False
    instance = drafter(cfg, prepared)
    found = features.prepare(location, features.spec(cfg, instance, "bfloat16" if use_gpu else "float32"))
    complete = bool(found) and features.holds_every_row(location, plan)
    if complete:
        state = "; it holds every row already (an earlier attempt's): the workers do not load the base"
    elif found:
        state = f"; {found} files kept from an earlier attempt, later passes read it instead of running the base"
    else:
        state = "; later passes read it instead of running the base"
    print(f"feature cache: {sizing} in {join(location, features.DIR)}{state}", flush=True)
    return True, complete


def _resolve_shard_base(cfg: Config, use_gpu: bool) -> bool:
    """The preflight: per-worker memory estimated from the base's ``config.json``; decides ``shard_base: auto``
    and refuses, in one line with the numbers and a fix, a run that cannot fit."""
    from medusa_ray import preflight

    memory = preflight.worker_memory_gib(cfg, use_gpu)
    shard = preflight.check_train(cfg, use_gpu, memory)
    known = f" of {memory:.0f} GiB" if memory else " (a worker's memory is unknown: train.worker_memory_gb checks it)"
    print(f"preflight: {preflight.train_estimate(cfg, use_gpu, shard).line()}{known}", flush=True)
    return shard

def _render(state: dict[str, Any]) -> tuple[int, int | None, str]:
    postfix = f"loss {state['loss']:.3f}"
    if state.get("expected_acceptance") is not None:
        postfix += f", expected acceptance {state['expected_acceptance']:.2f}"
    return state["step"], state["total"], postfix


def _fit(cfg: Config, plan, schedule: Schedule, location: str, use_gpu: bool, prepared,
         features_complete: bool = False) -> TrainResult:
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer


    t = cfg.train
    # Checkpoints are ranked by validation; Ray Train keeps the best ones and always the latest (to resume).
    score = {"checkpoint_score_attribute": "val_smoothed_expected_acceptance", "checkpoint_score_order": "max"} \
        if plan.val_rows else {}
    with progress.board("train", "steps", _render) as board:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.to_dict(), "plan": plan.to_dict(), "schedule": asdict(schedule),
                               "run_dir": location, "board": board, "prepared": prepared,
                               "faults": faults.active(), "features_complete": features_complete},
            torch_config=TorchConfig(backend=torch_backend(bool(use_gpu))),
            # SPREAD: one worker per node where possible, so workers don't contend for one node's GPUs and bus.
            scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=bool(use_gpu),
                                         placement_strategy="SPREAD" if t.num_workers > 1 else "PACK"),
            run_config=RunConfig(
                name=t.run_name,
                storage_path=t.storage_path,
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, **score),
                failure_config=FailureConfig(max_failures=t.max_failures),
                # Ray Train's controller narrates every report at INFO on its console handler.
                logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            # Too many rows it cannot train on: surface that one line, not the Ray traceback.
            bad_rows = re.search(r"BadRowError: (train data: [^\n]*)", str(exc))
            if bad_rows:
                raise UserError(bad_rows.group(1)) from None
            raise

    found = run_checkpoints(t.storage_path, t.run_name)
    if not found:
        raise RuntimeError(f"training finished but Ray Train registered no checkpoint in {location}")
    checkpoint, meta = found[-1].uri, found[-1].meta
    best = best_checkpoint(found)
    out = result.return_value or {}
    metrics = out.get("metrics") or meta.metrics or dict(result.metrics or {})
    validation = out.get("validation") or meta.validation or {}
    plots = [join(location, Path(p).name) for p in out.get("plots") or []]
    state = out.get("progress") or {}
    return TrainResult(checkpoint=checkpoint, global_step=meta.global_step, metrics=metrics,
                       resumed_from=int(out.get("resumed_from", meta.global_step)), run_dir=location,
                       plot=plots[0] if plots else None, plots=plots,
                       data=meta.data, nodes=worker_nodes(checkpoint), validation=validation,
                       best_checkpoint=best.uri, best_validation=best.meta.validation or {},
                       stopped_early=bool(state.get("stopped_early")), stop_reason=state.get("stop_reason", ""),
                       peak_memory_mib=out.get("peak_memory_mib"),
                       tokens_per_s=out.get("tokens_per_s"), method=t.method,
                       train_cfg=cfg.to_dict()["train"])


def plan_schedule(t, train_rows: int) -> Schedule:
    """How long to train: exactly ``max_steps`` or ``epochs`` when given; otherwise up to ``max_epochs`` passes
    within ``[min_steps, step_budget]`` steps, stopping early once validation stops improving."""
    per_step = t.num_workers * t.batch_size * t.grad_accum
    steps_per_epoch = max(1, math.ceil(train_rows / per_step))
    if t.max_steps is not None:
        total, early, max_epochs = t.max_steps, False, None
    elif t.epochs is not None:
        total, early, max_epochs = t.epochs * steps_per_epoch, False, t.epochs
    else:
        total = min(max(t.max_epochs * steps_per_epoch, t.min_steps), t.step_budget)
        # Small data takes more than max_epochs passes to reach min_steps: epochs are not the limit then.
        early, max_epochs = True, None if t.max_epochs * steps_per_epoch < t.min_steps else t.max_epochs
    val_every = t.val_every or min(500, max(10, steps_per_epoch // 2))
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_ratio * total)
    max_bad = int(t.max_bad_rows) if t.max_bad_rows >= 1 else int(t.max_bad_rows * train_rows)
    return Schedule(total_steps=total, warmup_steps=min(warmup, max(total - 1, 0)), val_every=val_every,
                    checkpoint_every=t.checkpoint_every or val_every, early_stopping=early, min_steps=t.min_steps,
                    patience=t.patience, max_epochs=max_epochs, max_bad_rows=max_bad,
                    min_improvement=t.min_improvement, smoothing=t.val_smoothing)


def _resolve_paths(cfg: Config) -> Config:
    """Absolute paths: Ray Train workers run in their own working directory."""
    cfg = cfg.model_copy(deep=True)
    if Path(cfg.model).expanduser().exists():
        cfg.model = str(Path(cfg.model).expanduser().resolve())
    cfg.train.data = str(Path(cfg.train_data).expanduser().resolve())
    if "://" not in cfg.train.storage_path:
        cfg.train.storage_path = str(Path(cfg.train.storage_path).expanduser().resolve())
    if cfg.train.deepspeed_config:
        cfg.train.deepspeed_config = str(Path(cfg.train.deepspeed_config).expanduser().resolve())
    return cfg


def run_location(cfg: Config) -> str:
    """``<train.storage_path>/<train.run_name>`` (a path or URI): checkpoints, tracker logs, metrics, plots."""
    cfg = _resolve_paths(cfg)
    return run_files.run_location(cfg.train.storage_path, cfg.train.run_name)


def track_summary(cfg: Config, summary: dict[str, Any], prefix: str) -> None:
    """Another stage's numbers (distill's) go to the same tracked runs as training's, under ``prefix``."""
    if not cfg.train.tracking:
        return
    from medusa_ray.tracking import open_tracker

    location = run_location(cfg)
    with open_tracker(cfg, str(run_files.pull(location))) as tracker:
        tracker.log_summary(summary, prefix=prefix)
    run_files.push(location)


def local_run_dir(cfg: Config) -> Path:
    """Where this node keeps the run's files: the run directory, or this node's mirror of one in object storage."""
    return run_files.local_dir(run_location(cfg))


def _columns(files: list[str]) -> set[str]:

    cols: set[str] | None = None
    for f in files:
        names = set(parquet.read_schema(f).names)
        cols = names if cols is None else cols & names
    return cols or set()


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _check_rows_model(files: list[str], model: str, data: str) -> None:
    """Heads learn what ``model`` says: rows distill labelled with another model are refused in one line.
    (Rows without a ``model`` label, made by hand, are taken as they are.)"""

    labels: set[str] = set()
    for f in files:
        if "model" in parquet.read_schema(f).names:
            labels.update(m for m in parquet.read_table(f, columns=["model"]).column("model").unique().to_pylist() if m)
    others = sorted(m for m in labels if not _same_model(m, model))
    if others:
        raise UserError(f"train data {data} holds rows distilled from {', '.join(others)}, not model={model}; "
                        "heads must learn this model's own outputs: distill it into a new distill.output_dir")


def _base_dims(model: str) -> tuple[int, int]:
    from transformers import AutoConfig

    check_local_model(model)
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable model is the user's to fix
        raise UserError(f"model {model!r}: cannot load its config ({str(exc).splitlines()[0]})") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size), int(text.vocab_size)


def _check_deepspeed_json(path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"train.deepspeed_config: {path} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"train.deepspeed_config: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"train.deepspeed_config: {path} must hold a JSON object")


def _check_resumable(cfg: Config, hidden_size: int, vocab_size: int) -> None:
    """A re-run resumes the run's latest checkpoint; refuse one that cannot fit this config."""
    t = cfg.train
    found = run_checkpoints(t.storage_path, t.run_name)
    if not found:
        return
    latest, meta = found[-1].uri, found[-1].meta
    # The drafter's own shape first (what a user changed), then the base it was trained on.
    expected = drafters.get(t.method).shape(t, hidden_size, vocab_size)
    flat = meta.flat()
    for key, value in expected.items():
        theirs = flat.get(key)
        if theirs != value:
            raise UserError(
                f"run {t.run_name!r} in {t.storage_path} has a checkpoint ({_name(latest)}) with {key}={theirs!r} "
                f"but this config gives {value!r}; use another train.run_name to start a new run"
            )
    if meta.zero_stage > 0 and meta.world_size != t.num_workers:
        raise UserError(
            f"run {t.run_name!r}: checkpoint {_name(latest)} was written by {meta.world_size} workers with ZeRO "
            f"stage {meta.zero_stage}; resume with train.num_workers={meta.world_size}"
        )
    print(f"resuming run {t.run_name!r} from step {meta.global_step} ({latest})", flush=True)


def _name(checkpoint: str) -> str:
    return checkpoint.rstrip("/").rsplit("/", 1)[-1]
