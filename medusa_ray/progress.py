"""One progress display per stage, for a person at a terminal and for a log file alike.

On a terminal it is a tqdm bar redrawn in place. Anywhere else (``ray job logs``, a CI log, ``> file``) a
redrawn bar would leave one line per update, so it prints a plain line every ``interval_s`` seconds and a
last one at the end instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_INTERVAL_S = 30.0


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
                 interval_s: float = LOG_INTERVAL_S, stream: TextIO | None = None):
        self.desc, self.total, self.unit, self.interval_s = desc, total, unit, interval_s
        self.stream = stream or sys.stderr
        self.n, self.postfix = initial, ""
        self._bar = None
        self._printed = time.monotonic()
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
        elif time.monotonic() - self._printed >= self.interval_s:
            self._line()

    def _line(self) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        self.stream.write(f"{self.desc}: {done} {self.unit}" + (f", {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()
        self._printed = time.monotonic()

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
