"""Quiet console, full log file: where every log line of a run goes.

The console shows our stage lines, one progress bar per stage, warnings and errors, and the summaries. The log
file (``<stage output>/logs/<command>-<time>.log``, named in the summary) gets everything, from the driver and
from every Ray worker; ``--verbose`` shows everything on the console too. How, without filtering any text:

- **Levels decide the stream, in every Ray worker** (``worker_process_setup_hook``): INFO and below to stdout,
  WARNING and above to stderr. vLLM leaves its records to that setup (``VLLM_CONFIGURE_LOGGING=0``); in the
  engine's own subprocesses, which no hook reaches, that leaves its warnings on stderr.
- **The driver routes Ray's forwarded lines by that stream** (Ray tags each batch ``is_err``): stderr to the
  console and the file, stdout to the file only. tqdm_ray updates still reach Ray's bar renderer.
- **Libraries' own switches for the rest**: Serve writes its component logs (replicas, vLLM in them, the
  controller) to files in ``<log dir>/serve`` (``LoggingConfig(logs_dir=...)``, ``RAY_SERVE_LOG_TO_STDERR=0``)
  with no access log; Ray Data's bars and start-of-execution lines are off (our bar instead); Ray's, Serve's
  and Ray Data's driver-side loggers keep their handlers for the file and show WARNING and up on the console.

The routing replaces one Ray-internal handler (``medusa_ray.compat.route_worker_lines``); where it is missing,
Ray's own printing is left as it is.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medusa_ray import compat

VERBOSE_ENV = "MEDUSA_RAY_VERBOSE"
"""Set (by ``--verbose``) in the driver and, through the runtime env, in every Ray worker: libraries log in full."""


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"

LOG_DIR_ENV = "MEDUSA_RAY_LOG_DIR"
"""The run's log directory, for workers (Serve's files, vLLM's file) and the driver's router."""
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_state: dict = {"file": None, "path": None}


def log_file() -> Path | None:
    """This process's full log file, once ``setup`` chose one."""
    return _state["path"]


def setup(verbose_flag: bool) -> None:
    """The driver's console logging (called first thing by the CLI and the jobs)."""
    if not verbose_flag:
        # Read at import: Serve's driver-side loggers then write to files, and transformers and the Hub client
        # draw no bar per checkpoint file they load or write.
        os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # For the processes this one starts (vLLM's engine, when a stage runs in-process), as for Ray workers.
        for key in ("TORCH_CPP_LOG_LEVEL", "TORCH_LOGS", "PYTHONWARNINGS"):
            os.environ.setdefault(key, worker_env()[key])
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


def adopt_library_loggers() -> None:
    """Ray, Serve and Ray Data give their driver-side loggers handlers of their own (so ours never see their
    records): give them our log file and (unless ``--verbose``) show only WARNING and up of theirs on the
    console. Called after each import that sets them up."""
    file_handler = _state.get("handler")
    for name in ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune"):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not verbose() and isinstance(handler, logging.StreamHandler) and getattr(
                    handler, "stream", None) in (sys.stderr, sys.stdout):
                handler.setLevel(logging.WARNING)
        if file_handler is not None and not logger.propagate and file_handler not in logger.handlers:
            logger.addHandler(file_handler)
    # Ray Data's one-time hint that its bars are off: we turned them off for our own bar.
    logging.getLogger(compat.RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)


def console_worthy(record: logging.LogRecord, ours_from: int = logging.INFO) -> bool:
    """What a person sees: ours from INFO (in the driver; from WARNING in workers), vLLM's from ERROR (its warnings
    on CPU are environment notes), everyone else's from WARNING."""
    top = record.name.split(".")[0]
    if top == "medusa_ray":
        return record.levelno >= ours_from
    if top == "vllm":
        return record.levelno >= logging.ERROR
    return record.levelno >= logging.WARNING


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return console_worthy(record)


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
    _state.update(file=stream, path=path, handler=handler, lock=threading.Lock())
    adopt_library_loggers()
    os.environ[LOG_DIR_ENV] = str(directory.resolve())
    return path


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of this job gets (through the runtime env)."""
    if verbose():
        return {VERBOSE_ENV: "1"}
    # vLLM leaves its records to the process's logging (the hook's split); torch's C++ notes and Python's
    # FutureWarnings from library internals are for library developers.
    # torch._library warns in every engine process that Triton is missing, which on CPU it always is.
    env = {"VLLM_CONFIGURE_LOGGING": "0", "RAY_SERVE_LOG_TO_STDERR": "0", "TORCH_CPP_LOG_LEVEL": "ERROR",
           "TORCH_LOGS": os.environ.get("TORCH_LOGS", "-torch._library"),
           "PYTHONWARNINGS": "ignore::FutureWarning", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if os.environ.get(LOG_DIR_ENV):
        env[LOG_DIR_ENV] = os.environ[LOG_DIR_ENV]
    return env


def serve_logging() -> dict | None:
    """Serve's ``LoggingConfig``: no access log, text records, files in the run's log dir (None: Serve's own
    defaults, with ``--verbose``)."""
    if verbose():
        return None
    config = {"enable_access_log": False, "encoding": "TEXT", "log_level": "INFO"}
    if os.environ.get(LOG_DIR_ENV):
        config["logs_dir"] = str(Path(os.environ[LOG_DIR_ENV]) / "serve")
    return config


def worker_setup() -> None:
    """``worker_process_setup_hook`` of every Ray worker: console-worthy records to stderr, the rest to stdout.
    Never raises (an exception here would kill the worker)."""
    try:
        root = logging.getLogger()
        if verbose():  # everything, as it comes; only give the root logger a handler if it has none
            if not root.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter(_FORMAT))
                root.addHandler(handler)
                root.setLevel(logging.INFO)
            return
        root.setLevel(logging.INFO)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for stream, keep in ((sys.stdout, lambda r: not console_worthy(r, logging.WARNING)),
                             (sys.stderr, lambda r: console_worthy(r, logging.WARNING))):
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter(_FORMAT))
            handler.addFilter(keep)
            root.addHandler(handler)
        # Ray's own loggers keep their records but follow the same split.
        for name in ("ray", "ray.serve", "ray.data", "ray.train"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
            logger.propagate = True
    except Exception as exc:  # noqa: BLE001
        print(f"medusa-ray: could not set up worker logging: {exc!r}", file=sys.stderr)


def replica_setup() -> None:
    """In a Serve replica: Serve sends the replica's stdout and stderr to its own log files
    (``RAY_SERVE_LOG_TO_STDERR=0``), but Serve LLM's JSON handler on the root logger holds the original stderr,
    which Ray forwards to the console. Point the root logger at the redirected stream instead."""
    if verbose():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)  # the redirected stream: Serve's replica log file
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def configure_vllm() -> None:
    """In a process about to start a vLLM engine: the same split for vLLM's records in this process and in the
    engine's subprocesses (which no Ray hook reaches), from a dictConfig file of this process's own."""
    if verbose():
        return
    import json
    import tempfile

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": _FORMAT}},
        "filters": {"console": {"()": "medusa_ray.logs.ConsoleWorthy"},
                    "rest": {"()": "medusa_ray.logs.NotConsoleWorthy"}},
        "handlers": {
            # In a Ray worker stdout reaches the driver's log file; in the driver itself, the file does.
            "out": ({"class": "logging.FileHandler", "filename": str(log_file())} if log_file() else
                    {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"})
                   | {"formatter": "plain", "filters": ["rest"]},
            "err": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr",
                    "filters": ["console"]},
        },
        "loggers": {"vllm": {"handlers": ["out", "err"], "level": "INFO", "propagate": False}},
    }
    # A file of this process's own (mkstemp: an unpredictable name, mode 0600), never a fixed path in the shared
    # temp dir: another local user could swap in a config whose "()" factory runs code in vLLM's processes.
    fd, name = tempfile.mkstemp(prefix="medusa-ray-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    path = Path(name)
    atexit.register(path.unlink, missing_ok=True)
    os.environ.update(VLLM_CONFIGURE_LOGGING="1", VLLM_LOGGING_CONFIG_PATH=str(path))


class ConsoleWorthy(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return console_worthy(record, logging.WARNING)


class NotConsoleWorthy(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not console_worthy(record, logging.WARNING)


def route_worker_lines() -> None:
    """After ``ray.init``: worker stdout to the log file only (both, with ``--verbose``), stderr to both."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

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
            compat.print_worker_lines({**data, "lines": shown}, sys.stderr)

    compat.route_worker_lines(handle)  # another Ray without the dispatcher: its own printing stays


@contextmanager
def serve_llm_import() -> Iterator[None]:
    """Around ``import ray.serve.llm``: it replaces this process's root handlers with a JSON one, and the vLLM
    modules it pulls in log import-time notes through it. vLLM's noisy module goes first, under our handlers;
    ours are back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import vllm.triton_utils  # noqa: F401 - ``import vllm`` alone is lazy
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
