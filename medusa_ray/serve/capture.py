"""Traffic capture (opt-in, ``serve.capture``): the prompts the served app receives, as distill's input.

Each ingress replica appends the chat requests it samples (``serve.capture_rate``) to a file of its own in
``serve.capture_dir``, one ``{"messages": [...]}`` line each (messages JSONL, what ``distill.input`` reads
unchanged: point it at the directory), until the file reaches ``serve.capture_max_mb``. Only the roles and text
distill uses are kept (system, user, assistant; text parts of multi-part content); sampling parameters, tools and
images are not. Recording never fails a request: a full disk or a bad message costs the record, not the reply.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

from medusa_ray.config import Config
from medusa_ray.writable import check_writable

__all__ = ["capture_settings", "Recorder", "prompt_messages"]

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")


def capture_settings(cfg: Config) -> dict[str, Any]:
    """What each ingress replica needs to record (plain data, passed to the replicas), the directory checked."""
    s = cfg.serve
    directory = s.capture_dir or str(Path(cfg.distill.output_dir).expanduser().resolve().parent / "traffic")
    if "://" in directory:
        from medusa_ray.errors import UserError

        raise UserError(f"serve.capture_dir={directory}: must be a local or shared-filesystem directory")
    directory = str(Path(directory).expanduser().resolve())
    check_writable(directory, "serve.capture_dir")
    return {"directory": directory, "rate": s.capture_rate, "max_bytes": int(s.capture_max_mb * 2**20)}


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        texts = [t for t in texts if isinstance(t, str)]
        return "".join(texts) if texts else None
    return None


def prompt_messages(messages: Any) -> list[dict[str, str]] | None:
    """A request's messages as distill reads them, or None when there is nothing distill could use."""
    out = []
    for message in messages or []:
        if hasattr(message, "model_dump"):
            message = message.model_dump()
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            continue
        text = _text(message.get("content"))
        if text is None:
            continue
        out.append({"role": message["role"], "content": text})
    return out if any(m["role"] == "user" for m in out) else None


class Recorder:
    def __init__(self, directory: str, rate: float = 1.0, max_bytes: int = 100 * 2**20, seed: int | None = None):
        Path(directory).mkdir(parents=True, exist_ok=True)
        name = f"traffic-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self.path = Path(directory) / name
        self.rate, self.max_bytes = rate, max_bytes
        self.written, self.full = 0, False
        self._random = random.Random(seed)

    def record(self, messages: Any) -> bool:
        """Append one request's messages (sampled, within the size cap); True when written. Never raises."""
        try:
            if self.full or self._random.random() >= self.rate:
                return False
            clean = prompt_messages(messages)
            if clean is None:
                return False
            data = (json.dumps({"messages": clean}, ensure_ascii=False) + "\n").encode("utf-8")
            if self.written + len(data) > self.max_bytes:
                self.full = True
                log.warning("traffic capture: %s reached serve.capture_max_mb; no more prompts are recorded here",
                            self.path)
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.written += len(data)
            return True
        except Exception as exc:  # noqa: BLE001 - recording must never fail the request it records
            log.warning("traffic capture: could not record a prompt: %s", exc)
            return False
