"""One progress display per stage, for a person at a terminal and for a log file alike.

On a terminal it is a tqdm bar redrawn in place. Anywhere else (``ray job logs``, a CI log, ``> file``) a
redrawn bar would leave one line per update, so it prints a plain line every ``interval_s`` seconds and a
last one at the end instead.

The work itself runs in Ray workers, whose output reaches the driver as log lines. So a stage's workers post
their state to a ``Board`` (a small actor, fire and forget) and the driver draws the bar from it (``watch``).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TextIO

LOG_INTERVAL_S = 30.0


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
                 interval_s: float = LOG_INTERVAL_S, stream: TextIO | None = None):
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.stream = stream or sys.stderr
        self.n, self.postfix = initial, ""
        self._start, self._start_n = time.monotonic(), initial
        self._bar = None
        self._printed = time.monotonic()
        self._last_line = ""
        self._closed = False
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc=desc, total=total, unit=unit, initial=initial, file=self.stream,
                             dynamic_ncols=True, leave=True)

    def update(self, n: int, postfix: str = "", total: int | None = None) -> None:
        """Move to ``n`` done (absolute), with a short ``postfix`` (rates, loss...)."""
        self.n, self.postfix = n, postfix
        if total is not None:
            self.total = total
        if self._bar is not None:
            if total is not None:
                self._bar.total = total
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update(n - self._bar.n)
        elif n and time.monotonic() - self._printed >= self.interval_s:  # nothing done yet: nothing to say
            self._line()

    def _line(self) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        extra = [self.postfix] if self.postfix else []
        rate = (self.n - self._start_n) / max(time.monotonic() - self._start, 1e-9)
        if self.total and self.n < self.total and rate > 0:
            extra.append(f"ETA {_duration((self.total - self.n) / rate)}")
        line = f"{self.desc}: {done} {self.unit}" + "".join(f", {e}" for e in extra)
        self._printed = time.monotonic()
        if line == self._last_line:  # nothing moved since the last line (the final state, often): say it once
            return
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line = line

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.n:
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Board:
    """A Ray actor holding one stage's latest progress: workers ``post`` to it, the driver ``read``s it."""

    def __init__(self):
        self._state: dict[str, Any] = {}

    def post(self, state: dict[str, Any]) -> None:
        self._state = state

    def read(self) -> dict[str, Any]:
        return self._state


@contextmanager
def watch(desc: str, unit: str, read: Callable[[], dict | None],
          render: Callable[[dict], tuple[int, int | None, str]]) -> Iterator[None]:
    """Draw a bar from ``read()`` (polled every second in a thread) for the ``with`` block;
    ``render(state) -> (done, total, postfix)``."""
    bar = Progress(desc, unit=unit)
    stop = threading.Event()

    def show() -> None:
        try:
            state = read()
        except Exception:  # noqa: BLE001 - a progress bar never fails the run
            return
        if state:
            done, total, postfix = render(state)
            bar.update(done, postfix, total=total)

    def loop() -> None:
        while not stop.wait(1.0):
            show()

    thread = threading.Thread(target=loop, name=f"{desc}-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()
        bar.close()


@contextmanager
def board(desc: str, unit: str, render: Callable[[dict], tuple[int, int | None, str]]) -> Iterator[Any]:
    """A ``Board`` actor for the ``with`` block, drawn as a bar; yields its handle for the workers."""
    import ray

    handle = ray.remote(Board).options(num_cpus=0).remote()
    try:
        with watch(desc, unit, lambda: ray.get(handle.read.remote(), timeout=10), render):
            yield handle
    finally:
        ray.kill(handle)
