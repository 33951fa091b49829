"""Experiment tracking: the same curves in TensorBoard, Weights & Biases and MLflow.

``open_tracker(cfg, run_dir)`` opens every backend named in ``train.tracking`` through the library's own
integration (``SummaryWriter``, ``wandb.init``, ``MlflowClient``) and logs an allow-list of the config as
run parameters (``tracked_params``: how the drafter was made, never where data, checkpoints or credentials
live). Only the process that calls it logs; ``train`` calls it on rank 0.

A tracker is often a shared or hosted service: every string sent to it, and the MLflow URI kept in
``tracking.json``, goes through ``medusa_ray.redact`` first, so a URL's user, password and query never leave.

Tracking must never cost a training run: a backend that cannot start or that fails later is reported once
as a warning and skipped. W&B falls back to offline mode (upload later with ``wandb sync``) when its
service is unreachable or no API key is configured.

Resume: ``<run_dir>/tracking.json`` remembers the W&B run id, the MLflow run and the TensorBoard directory,
so opening a tracker again for the same run directory appends to the same tracked runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from medusa_ray.config import Config
from medusa_ray.redact import public_location, strip_credentials, strip_credentials_in_text

log = logging.getLogger(__name__)

STATE_FILE = "tracking.json"

# W&B must never hold training hostage: bounded waits for init (then offline) and for the final upload.
WANDB_INIT_TIMEOUT_S = 20.0
WANDB_FINISH_TIMEOUT_S = 60.0
WANDB_FLUSH_INTERVAL_S = 1.0
# A remote MLflow server that is down would otherwise be retried for minutes on every call.
_MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# Consecutive failures after which a backend is dropped for the rest of the run.
_MAX_FAILURES = 3
_MLFLOW_PARAM_MAX_CHARS = 6000
# Config keys logged as run parameters: how the drafter is made and how the run is set up, nothing about where
# data, checkpoints or servers are (no storage or data paths, no engine kwargs, which may hold anything).
# ``model`` goes as a public location (a Hub id, or a path's last components), URLs without credentials.
_TRACKED_SETTINGS: dict[str, tuple[str, ...]] = {
    "distill": ("mode", "temperature", "top_p", "max_tokens", "seed", "endpoint", "format", "limit",
                "num_replicas", "min_replicas", "max_replicas", "accelerator", "max_in_flight", "concurrency",
                "shard_size", "max_retries", "retry_backoff_s", "request_timeout_s"),
    "train": ("method", "medusa_num_heads", "medusa_num_layers", "share_lm_head", "eagle3_ttt_steps",
              "eagle3_draft_vocab_size", "eagle3_layers", "head_decay", "topk", "max_length", "logits_chunk_tokens",
              "num_workers", "use_gpu", "zero_stage", "batch_size", "grad_accum", "lr", "weight_decay",
              "warmup_ratio", "warmup_steps", "max_steps", "epochs", "max_epochs", "min_steps", "step_budget",
              "patience", "val_fraction", "val_min_rows", "val_max_rows", "val_every", "max_bad_rows", "seed",
              "run_name", "checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "tracking",
              "wandb_project", "mlflow_experiment", "mlflow_tracking_uri"),
    "export": ("push_to_hub", "private"),
    "eval": ("num_prompts", "max_tokens", "num_speculative_tokens", "accelerator", "compare_untrained"),
}


def tracked_params(cfg: Config) -> dict[str, Any]:
    """The run parameters ``open_tracker`` logs: the allow-list above, ``model`` as a public location, every
    URL without credentials."""
    tree = cfg.to_dict()
    params: dict[str, Any] = {"model": public_location(tree.get("model"))}
    for section, keys in _TRACKED_SETTINGS.items():
        values = tree.get(section) or {}
        params[section] = {k: values[k] for k in keys if k in values}
    return _scrubbed(params)


def _scrubbed(value: Any) -> Any:
    """``value`` with credentials stripped from every URL in every string it holds."""
    if isinstance(value, str):
        return strip_credentials_in_text(value)
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrubbed(v) for v in value]
    return value


def open_tracker(cfg: Config, run_dir: str | os.PathLike) -> "Tracker":
    """Open the backends in ``cfg.train.tracking`` for the run in ``run_dir`` and log the config as params.

    ``run_dir`` is the run's local directory (``<storage_path>/<run_name>``): TensorBoard logs, W&B's
    offline files and the default MLflow store live there, next to ``tracking.json``.
    """
    run_dir = Path(run_dir)
    state_path = run_dir / STATE_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("tracking: disabled, cannot create the run directory: %s", _one_line(exc))
        return Tracker([])
    state = _read_state(state_path)

    openers = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
    backends = []
    for name in dict.fromkeys(cfg.train.tracking):  # de-duplicated, in the user's order
        try:
            backend = openers[name](cfg, run_dir, state.get(name) or {})
        except Exception as exc:  # noqa: BLE001 - tracking must not fail the run
            log.warning("tracking: %s disabled, it could not start: %s", name, _one_line(exc))
            continue
        state[name] = backend.state
        backends.append(backend)
    try:
        _write_state(state_path, state)
    except OSError as exc:
        log.warning("tracking: cannot write %s (%s); a resumed run will start new tracked runs",
                    state_path, _one_line(exc))

    tracker = Tracker(backends)
    tracker.log_params(tracked_params(cfg))
    return tracker


class Tracker:
    """Fans every call out to the open backends; a failing backend warns once and never raises."""

    def __init__(self, backends: list["_Backend"]):
        self._backends = list(backends)
        self._failures: dict[str, int] = {}
        self._warned: set[str] = set()
        self._last_step = 0
        self._closed = False

    @property
    def backends(self) -> list[str]:
        return [b.name for b in self._backends]

    def log_params(self, params: dict[str, Any]) -> None:
        """Run parameters (nested dicts are flattened to ``section.key``); URLs lose their credentials. The
        config's allow-list (``tracked_params``) is logged at open."""
        self._fan_out("log_params", _scrubbed(params))

    def log_metrics(self, metrics: dict[str, Any], step: int, prefix: str = "train/") -> None:
        """One step's metrics, keys prefixed (``loss`` -> ``train/loss``; validation's go under ``val/``);
        non-numbers are skipped."""
        step = int(step)
        scalars = {_prefixed(k, prefix): v for k, v in _numbers(metrics).items()}
        scalars[f"{prefix}step"] = step
        self._last_step = max(self._last_step, step)
        self._fan_out("log_metrics", scalars, step)

    def log_summary(self, summary: dict[str, Any], prefix: str = "summary/") -> None:
        """End-of-stage results, e.g. final per-head metrics, or distill's with ``prefix="distill/"``.

        Numbers become metrics at the last logged step; anything else (paths, names) is stored as text.
        """
        items = {_prefixed(k, prefix): float(v) if _is_number(v) else strip_credentials_in_text(str(v))
                 for k, v in _flatten(summary).items()}
        self._fan_out("log_summary", items, self._last_step)

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._fan_out("close", failed)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def _fan_out(self, method: str, *args) -> None:
        for backend in list(self._backends):
            try:
                getattr(backend, method)(*args)
                self._failures[backend.name] = 0
            except Exception as exc:  # noqa: BLE001 - tracking must not fail the run
                self._failed(backend, method, exc)

    def _failed(self, backend: "_Backend", method: str, exc: Exception) -> None:
        n = self._failures[backend.name] = self._failures.get(backend.name, 0) + 1
        if backend.name not in self._warned:
            self._warned.add(backend.name)
            log.warning("tracking: %s.%s failed, continuing without it for now: %s",
                        backend.name, method, _one_line(exc))
        if n >= _MAX_FAILURES and backend in self._backends:
            log.warning("tracking: %s disabled after %d failures in a row", backend.name, n)
            self._backends.remove(backend)


class _Backend:
    name = ""
    state: dict[str, Any]

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, scalars: dict[str, float], step: int) -> None: ...
    def log_summary(self, items: dict[str, Any], step: int) -> None: ...
    def close(self, failed: bool) -> None: ...


class _TensorBoard(_Backend):
    name = "tensorboard"

    def __init__(self, cfg: Config, run_dir: Path, state: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = state.get("log_dir") or str(run_dir / "tensorboard")
        self.state = {"log_dir": log_dir}
        self._writer = SummaryWriter(log_dir=log_dir, flush_secs=30)
        self._metric_names = ["train/loss"] + [
            f"train/medusa{k}_{m}" for k in range(cfg.train.medusa_num_heads) for m in ("loss", "top1")]
        self._params: dict[str, Any] = {}
        self._purged = False

    def log_params(self, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._params.update({k: _scalar_param(v) for k, v in _flatten(params).items()})
        # Written into this run's own event file (add_hparams would start a separate sub-run).
        writer = self._writer._get_file_writer()
        for summary in hparams(self._params, dict.fromkeys(self._metric_names, 0.0)):
            writer.add_summary(summary)
        table = "\n".join(f"| {k} | {v} |" for k, v in self._params.items())
        self._writer.add_text("params", "| param | value |\n| --- | --- |\n" + table)

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        if not self._purged:
            # A resumed run restarts at its checkpoint's step: hide what a crashed attempt logged at and
            # after that step (the same marker SummaryWriter(purge_step=...) writes).
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self._writer._get_file_writer().add_event(
                Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            self._purged = True
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, global_step=step)
        # A worker that dies takes its queued events with it; a flush per step costs a local write.
        self._writer.flush()

    def log_summary(self, items: dict[str, Any], step: int) -> None:
        for key, value in items.items():
            if _is_number(value):
                self._writer.add_scalar(key, float(value), global_step=step)
            else:
                self._writer.add_text(key, str(value), global_step=step)
        self._writer.flush()

    def close(self, failed: bool) -> None:
        self._writer.close()


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, cfg: Config, run_dir: Path, state: dict[str, Any]):
        import wandb

        # A first run gets its id from W&B; a resumed one passes it back.
        kwargs = dict(project=cfg.train.wandb_project, entity=cfg.train.wandb_entity, name=cfg.train.run_name,
                      id=state.get("id"), resume="allow", dir=str(run_dir))
        try:
            self._run = wandb.init(**kwargs, settings=_wandb_settings(wandb))
        except Exception as exc:  # noqa: BLE001 - unreachable service, no API key, bad entity...
            self._run = wandb.init(**kwargs, settings=_wandb_settings(wandb, mode="offline"))
            log.warning("tracking: W&B unavailable (%s); logging offline to %s/wandb, upload later with "
                        "`wandb sync --id %s %s/wandb/offline-run-*`", _one_line(exc), run_dir, self._run.id,
                        run_dir)
        self.state = {"id": self._run.id, "project": self._run.project, "entity": self._run.entity or None}
        # Curves are plotted against the global step, not W&B's own counter, so a run resumed from an
        # older checkpoint than where it crashed still draws (and is accepted) at the right x position.
        self._run.define_metric("train/step")
        self._run.define_metric("train/*", step_metric="train/step")

    def log_params(self, params: dict[str, Any]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars)

    def log_summary(self, items: dict[str, Any], step: int) -> None:
        self._run.summary.update(items)

    def close(self, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


def _wandb_settings(wandb, mode: str | None = None):
    settings = dict(init_timeout=WANDB_INIT_TIMEOUT_S, login_timeout=WANDB_INIT_TIMEOUT_S,
                    finish_timeout=WANDB_FINISH_TIMEOUT_S, reinit="create_new")
    if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:
        # When a Ray worker dies, its children (wandb-core) die with it and wandb-core's unwritten buffer
        # is lost: 15 s of curves by default, for offline runs all there is. Write to disk every second.
        settings["x_transaction_log_flush_interval"] = WANDB_FLUSH_INTERVAL_S
    if mode:
        settings["mode"] = mode
    return wandb.Settings(**settings)


class _MLflow(_Backend):
    name = "mlflow"

    def __init__(self, cfg: Config, run_dir: Path, state: dict[str, Any]):
        uri = cfg.train.mlflow_tracking_uri or (run_dir.resolve() / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store behind an opt-in; it is the zero-setup default asked for here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        else:
            for key, value in _MLFLOW_HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
        from mlflow.tracking import MlflowClient

        self._client = client = MlflowClient(tracking_uri=uri)
        # tracking.json keeps the URI without its password: resume recognises the store by that.
        public_uri = strip_credentials(uri)
        run = _mlflow_active_run(client, state.get("run_id")) if state.get("tracking_uri") == public_uri else None
        if run is not None:
            run_id, experiment_id = run.info.run_id, run.info.experiment_id
            client.update_run(run_id, status="RUNNING")
        else:
            experiment = client.get_experiment_by_name(cfg.train.mlflow_experiment)
            experiment_id = (experiment.experiment_id if experiment
                             else client.create_experiment(cfg.train.mlflow_experiment))
            run_id = client.create_run(experiment_id, run_name=cfg.train.run_name).info.run_id
        self._run_id = run_id
        self.state = {"tracking_uri": public_uri, "experiment_id": experiment_id, "run_id": run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow params are write-once: a resumed run keeps the values it started with.
        existing = self._client.get_run(self._run_id).data.params
        changed = []
        new = []
        for key, value in _flatten(params).items():
            text = str(value)[:_MLFLOW_PARAM_MAX_CHARS]
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed.append(key)
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            self._client.log_batch(self._run_id, params=new[i : i + 100])
        if changed:
            log.warning("tracking: MLflow params are immutable; keeping the first values of %s",
                        ", ".join(changed))

    def log_metrics(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def log_summary(self, items: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in items.items() if _is_number(v)]
        tags = [RunTag(k, str(v)) for k, v in items.items() if not _is_number(v)]
        self._client.log_batch(self._run_id, metrics=metrics, tags=tags)

    def close(self, failed: bool) -> None:
        self._client.set_terminated(self._run_id, status="FAILED" if failed else "FINISHED")


def _mlflow_active_run(client, run_id: str | None):
    """The run to resume, unless it was deleted meanwhile (then a new run is started)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - gone from the store: start afresh
        log.warning("tracking: MLflow run %s not found (%s); starting a new run", run_id, _one_line(exc))
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError) as exc:
        log.warning("tracking: ignoring unreadable %s (%s); starting new tracked runs", path, _one_line(exc))
        return {}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _scalar_param(value: Any) -> Any:
    # TensorBoard's hparams accept only bool, int, float and str.
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return False
    try:
        float(value)  # ints, floats, numpy and 0-d torch scalars
        return True
    except (TypeError, ValueError):
        return False


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    # NaN stays: a diverging loss is worth seeing on the curve.
    return {k: float(v) for k, v in metrics.items() if _is_number(v)}


def _prefixed(key: str, prefix: str) -> str:
    return key if "/" in key else prefix + key


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {strip_credentials_in_text(text[0]) if text else ''}"
