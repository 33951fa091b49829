"""Quiet console, full log file: where every log line of a run goes.

The console shows our stage lines, one progress bar per stage, warnings and errors, and the summaries. The log
file (``<stage output>/logs/<command>-<time>.log``, named in the summary) gets everything, from the driver and
from every Ray worker; ``--verbose`` shows everything on the console too. How, without filtering any text:

- **Levels decide the stream, in every process.** Ray workers (``worker_process_setup_hook``) and vLLM's own
  processes (``VLLM_LOGGING_CONFIG_PATH``) log INFO and below to stdout and WARNING and above to stderr.
- **The driver routes Ray's forwarded lines by that stream** (Ray tags each batch ``is_err``): stderr to the
  console and the file, stdout to the file only. tqdm_ray updates still reach Ray's bar renderer.
- **Libraries' own switches for the rest**: Serve writes its component logs to files in the same log dir
  (``LoggingConfig(logs_dir=...)``, ``RAY_SERVE_LOG_TO_STDERR=0``) with no access log; Ray Data's bars and
  start-of-execution lines are off (our bar instead); the driver's own loggers have a console handler at
  WARNING (``medusa_ray`` at INFO) and a file handler at INFO.

The routing replaces one Ray-internal handler (``ray._private.ray_logging.global_worker_stdstream_dispatcher``,
handler ``ray_print_logs``); where it is missing, Ray's own printing is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medusa_ray.cluster import VERBOSE_ENV, verbose

LOG_DIR_ENV = "MEDUSA_RAY_LOG_DIR"
"""The run's log directory, for workers (Serve's files, vLLM's file) and the driver's router."""
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state: dict = {"file": None, "path": None}


def log_file() -> Path | None:
    """This process's full log file, once ``setup`` chose one."""
    return _state["path"]


def setup(verbose_flag: bool) -> None:
    """The driver's console logging (called first thing by the CLI and the jobs)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT))
    if not verbose_flag:
        console.addFilter(_QuietFilter())
    root.addHandler(console)
    if verbose_flag:
        logging.getLogger("medusa_ray").setLevel(logging.DEBUG)


class _QuietFilter(logging.Filter):
    """Ours from INFO, everyone else's from WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] == "medusa_ray"


def start_file(directory: str | Path, command: str) -> Path:
    """Send everything (driver records at INFO and above, every worker line) to a new file in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    stream = open(path, "a", buffering=1, encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG if verbose() else logging.INFO)
    logging.getLogger().addHandler(handler)
    _state.update(file=stream, path=path, lock=threading.Lock())
    os.environ[LOG_DIR_ENV] = str(directory.resolve())
    return path


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of this job gets (through the runtime env)."""
    env = {"VLLM_LOGGING_CONFIG_PATH": str(_vllm_logging_config()), "RAY_SERVE_LOG_TO_STDERR": "0"}
    if os.environ.get(LOG_DIR_ENV):
        env[LOG_DIR_ENV] = os.environ[LOG_DIR_ENV]
    if verbose():
        env[VERBOSE_ENV] = "1"
    return env


def worker_setup() -> None:
    """``worker_process_setup_hook`` of every Ray worker: INFO and below to stdout, WARNING and up to stderr.
    Never raises (an exception here would kill the worker)."""
    try:
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for stream, keep in ((sys.stdout, lambda r: r.levelno < logging.WARNING),
                             (sys.stderr, lambda r: r.levelno >= logging.WARNING)):
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter(_FORMAT))
            handler.addFilter(keep)
            root.addHandler(handler)
        # Ray's own loggers keep their formats but follow the same split.
        ray_logger = logging.getLogger("ray")
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True
    except Exception as exc:  # noqa: BLE001
        print(f"medusa-ray: could not set up worker logging: {exc!r}", file=sys.stderr)


def _vllm_logging_config() -> Path:
    """vLLM configures logging in each of its processes (engine core, workers) from this file."""
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"vllm": {"format": "%(asctime)s %(levelname)s vllm %(name)s: %(message)s"}},
        "filters": {"below_warning": {"()": "medusa_ray.logs.BelowWarning"}},
        "handlers": {
            "out": {"class": "logging.StreamHandler", "formatter": "vllm", "stream": "ext://sys.stdout",
                    "filters": ["below_warning"]},
            "err": {"class": "logging.StreamHandler", "formatter": "vllm", "stream": "ext://sys.stderr",
                    "level": "WARNING"},
        },
        "loggers": {"vllm": {"handlers": ["out", "err"], "level": "INFO", "propagate": False}},
    }
    path = Path(tempfile.gettempdir()) / "medusa-ray-vllm-logging.json"
    text = json.dumps(config, indent=1)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


class BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def route_worker_lines() -> None:
    """After ``ray.init``: worker stdout to the log file only (both, with ``--verbose``), stderr to both."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
    except ImportError:  # another Ray: its own printing stays
        return

    def handle(data: dict) -> None:
        lines = data.get("lines") or []
        stream = _state.get("file")
        if stream is not None and data.get("pid") != "autoscaler":
            who = data.get("actor_name") or data.get("task_name") or ""
            tag = f"({who + ' ' if who else ''}pid={data.get('pid')}, ip={data.get('ip')})"
            with _state["lock"]:
                for line in lines:
                    if RAY_TQDM_MAGIC not in line:
                        stream.write(f"{tag} {line}\n")
        shown = lines if (data.get("is_err") or verbose() or stream is None or data.get("pid") == "autoscaler") \
            else [line for line in lines if RAY_TQDM_MAGIC in line]
        if shown:
            ray_worker.print_worker_logs({**data, "lines": shown}, sys.stderr)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("medusa_ray_logs")
    dispatcher.add_handler("medusa_ray_logs", handle)


@contextmanager
def keep_driver_logging() -> Iterator[None]:
    """Importing ``ray.serve.llm`` replaces the root logger's handlers with a JSON one in this process: undo it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
