"""train: Medusa heads on the frozen base model with Ray Train + DeepSpeed.

``run(cfg)`` checks everything it can on the driver (data, base model, DeepSpeed JSON, an existing
checkpoint of the same run), then starts a ``TorchTrainer`` whose workers run ``worker.train_loop``.
A re-run with the same ``train.run_name`` and ``train.storage_path`` continues from the run's latest
checkpoint (Ray Train V2 restores it from the run directory).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medusa_ray.config import Config
from medusa_ray.errors import UserError
from medusa_ray.train import run_files
from medusa_ray.train.checkpoints import find_latest_checkpoint, join, run_checkpoints, worker_nodes

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "run", "run_location", "find_latest_checkpoint"]


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
    data: dict[str, Any] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    """Ray node ids the training workers ran on."""


def run(cfg: Config) -> TrainResult:
    """Train the heads; return the final checkpoint, its global step and its metrics."""
    from medusa_ray.cluster import init_ray
    from medusa_ray.train.data import READ_COLUMNS, check_schema, list_data_files

    cfg = _resolve_paths(cfg)
    t = cfg.train
    files = list_data_files(cfg.train_data)
    columns = _columns(files)
    check_schema(files)
    hidden_size, vocab_size = _base_dims(cfg.model)
    if t.deepspeed_config:
        _check_deepspeed_json(t.deepspeed_config)
    location = run_files.run_location(t.storage_path, t.run_name)
    _check_resumable(cfg, hidden_size, vocab_size)

    init_ray(cfg.ray)
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from medusa_ray.train.worker import train_loop

    rows = _num_rows(files)
    if rows == 0:
        raise UserError(f"train data {cfg.train_data} has no rows")
    per_step = t.num_workers * t.batch_size * t.grad_accum
    total_steps = t.max_steps or max(1, t.epochs * math.ceil(rows / per_step))
    # Workers tokenize their own shard: they have the tokenizer loaded already, and extra Ray Data
    # tasks would each pay for importing transformers.
    ds = ray.data.read_parquet(files, columns=[c for c in READ_COLUMNS if c in columns])

    from medusa_ray.cluster import resolve_accelerator, torch_backend

    use_gpu = t.use_gpu if t.use_gpu != "auto" else resolve_accelerator("auto", "train.use_gpu") == "gpu"
    log.info("training %d heads on %d rows for %d steps with %d worker(s), ZeRO %d", t.medusa_num_heads, rows,
             total_steps, t.num_workers, t.zero_stage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "total_steps": total_steps, "run_dir": location},
        torch_config=TorchConfig(backend=torch_backend(bool(use_gpu))),
        # SPREAD: one worker per node where possible, so workers don't contend for one node's GPUs and bus.
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=bool(use_gpu),
                                     placement_strategy="SPREAD" if t.num_workers > 1 else "PACK"),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=t.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
        datasets={"train": ds},
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        # A worker hit a row it cannot train on: surface that one line, not the Ray traceback.
        bad_row = re.search(r"BadRowError: (train data row id=[^\n]*)", str(exc))
        if bad_row:
            raise UserError(bad_row.group(1)) from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {t.storage_path}/{t.run_name}")

    latest = run_checkpoints(t.storage_path, t.run_name)[-1:]
    if not latest:
        raise RuntimeError(f"training finished but Ray Train registered no checkpoint in {location}")
    checkpoint, meta = latest[0].uri, latest[0].meta
    out = result.return_value or {}
    metrics = out.get("metrics") or meta.get("metrics") or dict(result.metrics or {})
    global_step = int(meta.get("global_step", metrics.get("step", 0)))
    plot = out.get("plot")
    _print_summary(metrics, t.medusa_num_heads, t.head_decay, t.topk, global_step, checkpoint)
    return TrainResult(checkpoint=checkpoint, global_step=global_step, metrics=metrics,
                       resumed_from=int(out.get("resumed_from", global_step)), run_dir=location,
                       plot=join(location, Path(plot).name) if plot else None,
                       data=meta.get("data", {}), nodes=worker_nodes(checkpoint))


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


def _columns(files: list[str]) -> set[str]:
    import pyarrow.parquet as pq

    cols: set[str] | None = None
    for f in files:
        try:
            names = set(pq.read_schema(f).names)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{f}: not a readable Parquet file: {exc}") from None
        cols = names if cols is None else cols & names
    return cols or set()


def _num_rows(files: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _base_dims(model: str) -> tuple[int, int]:
    from transformers import AutoConfig

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
    expected = {
        "medusa_num_heads": t.medusa_num_heads,
        "medusa_num_layers": t.medusa_num_layers,
        "share_lm_head": t.share_lm_head,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
    }
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UserError(
                f"run {t.run_name!r} in {t.storage_path} has a checkpoint ({_name(latest)}) with {key}={meta.get(key)!r} "
                f"but this config gives {value!r}; use another train.run_name to start a new run"
            )
    if meta.get("zero_stage", 0) > 0 and meta.get("world_size") != t.num_workers:
        raise UserError(
            f"run {t.run_name!r}: checkpoint {_name(latest)} was written by {meta.get('world_size')} workers with ZeRO "
            f"stage {meta.get('zero_stage')}; resume with train.num_workers={meta.get('world_size')}"
        )
    print(f"resuming run {t.run_name!r} from step {meta.get('global_step')} ({latest})", flush=True)


def _name(checkpoint: str) -> str:
    return checkpoint.rstrip("/").rsplit("/", 1)[-1]


def _print_summary(metrics: dict[str, Any], num_heads: int, decay: float, topk: int, step: int, ckpt: str) -> None:
    tops = [f"top{i}" for i in range(1, topk + 1)]
    lines = [f"{'head':>4}  {'predicts':>8}  {'weight':>6}  {'loss':>7}  " + "  ".join(f"{c:>6}" for c in tops)]
    for k in range(num_heads):
        loss = metrics.get(f"medusa{k}_loss", float("nan"))
        accs = "  ".join(f"{metrics.get(f'medusa{k}_{c}', float('nan')):>6.3f}" for c in tops)
        lines.append(f"{k:>4}  {'t+' + str(k + 2):>8}  {decay**k:>6.3f}  {loss:>7.4f}  {accs}")
    print(f"\ntrained Medusa heads: step {step}, loss {metrics.get('loss', float('nan')):.4f}, "
          f"{metrics.get('tokens_per_s', float('nan')):.0f} tokens/s")
    print("\n".join(lines))
    print(f"checkpoint: {ckpt}\n")
