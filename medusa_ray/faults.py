"""Fault injection, for tests only: the one place a run learns that it should kill itself or record its rows.

Tests set ``MEDUSA_RAY_FAULTS`` to a JSON object; the driver reads it here and hands what a stage needs to its
workers explicitly, so no user-facing config key and no worker-side environment is involved:

- ``distill_kill_at``: ``first_reply`` | ``later_round`` | ``shard_write``: distill SIGKILLs its driver and the
  worker at that point (the first reply, the first reply of a conversation's third round, between a shard's
  write and its rename), to exercise resume.
- ``train_fail_at_step``: training rank 0 raises once when it reaches this step (a marker in the run dir
  survives the restart), to exercise Ray Train's recovery.
- ``train_record_rows_dir``: every rank appends the ids of each micro-batch it trains on to a file there.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "MEDUSA_RAY_FAULTS"
KNOWN = {
    "distill_kill_at": ("first_reply", "later_round", "shard_write"),
    "train_fail_at_step": int,
    "train_record_rows_dir": str,
}


def active() -> dict[str, Any]:
    """The faults the environment asks for ({} in every real run); a malformed value fails loudly."""
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    faults = json.loads(raw)
    if not isinstance(faults, dict):
        raise ValueError(f"{ENV} must hold a JSON object, got {raw!r}")
    for name, value in faults.items():
        kind = KNOWN.get(name)
        if kind is None:
            raise ValueError(f"{ENV}: unknown fault {name!r} (known: {', '.join(KNOWN)})")
        ok = value in kind if isinstance(kind, tuple) else isinstance(value, kind)
        if not ok:
            raise ValueError(f"{ENV}: {name}={value!r} is not valid")
    return faults


def get(name: str) -> Any:
    """One fault's value, or None."""
    if name not in KNOWN:
        raise KeyError(name)
    return active().get(name)


def env(**faults: Any) -> dict[str, str]:
    """The environment a test sets to inject ``faults`` (``monkeypatch.setenv(*env(...).popitem())``)."""
    return {ENV: json.dumps(faults)}
