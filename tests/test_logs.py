"""What a person sees: a quiet console with one progress display per stage, and everything in the log file."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from endpoint_standin import FlakyEndpoint

from medusa_ray import progress
from medusa_ray.logs import console_worthy
from medusa_ray.progress import Progress


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "m", None, None)


def test_console_shows_ours_from_info_vllm_from_error_and_the_rest_from_warning():
    assert console_worthy(_record("medusa_ray.distill", logging.INFO))
    assert not console_worthy(_record("medusa_ray.distill", logging.INFO), ours_from=logging.WARNING)  # in workers
    assert not console_worthy(_record("ray.data", logging.INFO))
    assert console_worthy(_record("ray.data", logging.WARNING))
    assert not console_worthy(_record("vllm.platforms", logging.WARNING))
    assert console_worthy(_record("vllm.v1.engine", logging.ERROR))


def test_a_worker_sends_what_a_person_should_see_to_stderr_and_the_rest_to_stdout():
    """Ray forwards a worker's two streams tagged apart; the driver routes by that tag."""
    code = ("from medusa_ray import logs; import logging; logs.worker_setup(); "
            "[logging.getLogger(n).log(l, f'{n}-{logging.getLevelName(l)}') for n, l in "
            "[('medusa_ray.x', 20), ('medusa_ray.x', 30), ('ray.train', 20), ('vllm.cpu', 30), ('vllm.cpu', 40)]]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [k for k in ("medusa_ray.x-INFO", "ray.train-INFO", "vllm.cpu-WARNING") if k in proc.stdout] == \
        ["medusa_ray.x-INFO", "ray.train-INFO", "vllm.cpu-WARNING"]
    assert "medusa_ray.x-WARNING" in proc.stderr and "vllm.cpu-ERROR" in proc.stderr
    assert "INFO" not in proc.stderr and "vllm.cpu-ERROR" not in proc.stdout


def test_progress_off_a_terminal_prints_sparse_lines_and_a_last_one(monkeypatch):
    now = [0.0]  # Progress's clock: moved by the test, not by waiting
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    stream = io.StringIO()  # not a terminal
    bar = Progress("distill", total=1000, unit="conversations", interval_s=0.2, stream=stream)
    bar.update(0, "starting")  # nothing done yet: nothing to say
    for n in range(1, 1001):
        bar.update(n, f"{n} so far")
        if n % 250 == 0:
            now[0] += 0.25
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) <= 6, lines  # one per interval, not one per update
    assert lines[-1].startswith("distill: 1000/1000 conversations, 1000 so far")
    assert "ETA" in lines[0] and "\r" not in stream.getvalue()

    # The last interval's line already says where it ended: closing does not say it again.
    stream = io.StringIO()
    bar = Progress("eval", total=4, unit="prompts", interval_s=0.0, stream=stream)
    for n in range(1, 5):
        bar.update(n)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "eval: 4/4 prompts" and lines.count("eval: 4/4 prompts") == 1, lines


def _distill_cli(tmp_path: Path, url: str, name: str, *flags: str) -> tuple[str, Path]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(12)))
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "medusa_ray", "distill", *flags, "--input", str(prompts), "--output", str(out),
         "model=served-model", f"distill.endpoint={url}", "distill.shard_size=4", "ray.num_cpus=4"],
        capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    (log_file,) = (out / "logs").glob("distill-*.log")
    return console, log_file


@pytest.mark.slow
def test_quiet_by_default_everything_in_the_log_file_and_on_the_console_with_verbose(tmp_path):
    endpoint = FlakyEndpoint(served="served-model")
    try:
        console, log_file = _distill_cli(tmp_path, endpoint.url, "quiet")
        detail = ("Starting execution of Dataset",  # Ray Data, in the driver
                  "requests in flight per actor")  # our Ray Data actor, forwarded by Ray
        full = log_file.read_text()
        assert all(d in full for d in detail), full[-3000:]
        assert not any(d in console for d in detail), console
        assert f"full log: {log_file}" in console and "distill -> " in console
        assert len(console.splitlines()) < 30, console

        console, log_file = _distill_cli(tmp_path, endpoint.url, "verbose", "--verbose")
        assert all(d in console for d in detail), console[-3000:]
        assert all(d in log_file.read_text() for d in detail)
    finally:
        endpoint.server.shutdown()
