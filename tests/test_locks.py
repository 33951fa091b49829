"""One writer per output location: a second run is refused in one line naming the holder, before it writes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medusa_ray.config import build_config
from medusa_ray.errors import UserError
from medusa_ray.locks import hold, lock_path

_HOLDER = """
import sys, time
from medusa_ray.locks import hold
with hold(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@contextlib.contextmanager
def another_run(location: Path, what: str):
    """A real second process holding the lock of ``location``, as a concurrent run would."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(location), what], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    out = tmp_path / "distilled"
    with another_run(out, "distill") as proc:
        with pytest.raises(UserError, match=rf"in use by distill \(pid {proc.pid} on {socket.gethostname()}"):
            with hold(out, "distill"):
                pytest.fail("entered a held lock")
        proc.send_signal(signal.SIGKILL)  # killed: the lock file stays behind, naming a dead pid
        proc.wait()
        assert lock_path(out).exists()
        with caplog.at_level(logging.WARNING, logger="medusa_ray.locks"):
            with hold(out, "distill") as taken:
                assert json.loads(taken.read_text())["pid"] == os.getpid()
        assert "stale lock" in caplog.text
    assert not lock_path(out).exists()  # released on exit


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    out = tmp_path / "export"
    lock_path(out).write_text(json.dumps({"what": "export", "host": "gpu-node-7", "pid": 1, "started": 0}))
    with pytest.raises(UserError, match=f"in use by export \\(pid 1 on gpu-node-7.*delete {lock_path(out)}"):
        with hold(out, "export"):
            pass
    assert lock_path(out).exists()


def test_the_same_process_may_nest(tmp_path):
    with hold(tmp_path / "x", "pipeline"), hold(tmp_path / "x", "distill"):
        pass
    assert not lock_path(tmp_path / "x").exists()


def test_every_stage_takes_its_lock_before_writing(tmp_path, random_tiny_model):
    from medusa_ray import distill, export, train
    from helpers import write_distilled

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    data = write_distilled(tmp_path / "data", n=16, model=str(random_tiny_model))
    cfg = build_config({}, [f"model={random_tiny_model}", f"distill.input={prompts}",
                            f"distill.output_dir={tmp_path / 'distilled'}", f"train.data={data}",
                            f"train.storage_path={tmp_path / 'runs'}", "train.run_name=r",
                            f"export.output_dir={tmp_path / 'export'}", "train.tracking=[]"])

    with another_run(tmp_path / "distilled", "distill"), pytest.raises(UserError, match="in use by distill"):
        distill.run(cfg)
    assert list((tmp_path / "distilled").iterdir()) == []  # checked writable, nothing written

    with another_run(tmp_path / "runs" / "r", "training run 'r'"), pytest.raises(UserError, match="in use by training"):
        train.run(cfg)
    assert not (tmp_path / "runs" / "r").exists()

    with another_run(tmp_path / "export", "export"), pytest.raises(UserError, match="in use by export"):
        export.run(cfg, checkpoint=str(tmp_path / "some-checkpoint"))
    assert not (tmp_path / "export").exists()


def test_two_starters_taking_over_one_stale_lock_cannot_both_hold(tmp_path, monkeypatch):
    """A reads the stale holder; before A acts on it, B reads the same stale holder, takes it over and holds.
    A must then see B's fresh lock and be refused, not delete it and hold too."""
    from medusa_ray import locks

    out = tmp_path / "distilled"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists, on this host: a stale holder
    lock_path(out).write_text(json.dumps({"what": "distill", "host": socket.gethostname(), "pid": dead.pid,
                                          "started": 0, "nonce": "stale"}))
    real_read = locks._read
    runs = contextlib.ExitStack()
    others = []

    def read_then_let_b_in(path):
        holder = real_read(path)
        if not others:  # only between A's first read and whatever A does with it
            others.append(runs.enter_context(another_run(out, "distill")))
        return holder

    monkeypatch.setattr(locks, "_read", read_then_let_b_in)
    with runs:
        with pytest.raises(UserError, match=rf"in use by distill \(pid {others[0].pid if others else ''}"):
            with hold(out, "distill"):
                pytest.fail("A and B both hold the lock")
        assert others, "the hook never ran"
        assert json.loads(lock_path(out).read_text())["pid"] == others[0].pid  # B's lock is intact
