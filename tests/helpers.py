"""Helpers shared by the test modules (``from helpers import ...``); the fixtures built on them are in conftest.py."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_for(condition: Callable[[], T], timeout: float, what: str, alive: Callable[[], str | None] | None = None,
             interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (returned), failing after ``timeout`` seconds with
    ``what`` and as soon as ``alive()`` returns a reason (say, the process that should make it true exited)."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if alive is not None and (reason := alive()):
            raise AssertionError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def write_distilled(out_dir: Path, n: int = 256, seed: int = 7, model: str = "tiny", shards: int = 2,
                    ids: str = "sha1", errors: bool = True) -> Path:
    """The tiny corpus's ``n`` conversations (``seed``) as distill writes them (contract 1), in ``shards`` Parquet
    files. ``ids``: ``"sha1"`` or ``"sha256"`` (a hash of the messages, as distill makes them) or a format of the
    row index (``"conv-{i}"``); ids decide training's validation split. ``errors``: also an ``errors/`` shard of
    failed requests, which must never be trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medusa_ray.tiny import corpus

    rows = []
    for i, messages in enumerate(corpus.conversations(n, seed)):
        if ids in ("sha1", "sha256"):
            row_id = hashlib.new(ids, json.dumps(messages).encode()).hexdigest()[:16]
        else:
            row_id = ids.format(i=i)
        rows.append({
            "id": row_id,
            "messages": messages,
            "mode": "chat",
            "model": model,
            "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 0},
            "prompt_tokens": sum(len(m["content"]) for m in messages if m["role"] != "assistant"),
            "completion_tokens": sum(len(m["content"]) for m in messages if m["role"] == "assistant"),
            "finish_reason": "stop",
        })
    schema = pa.schema([
        ("id", pa.string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("mode", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.struct([("temperature", pa.float64()), ("top_p", pa.float64()),
                                ("max_tokens", pa.int64()), ("seed", pa.int64())])),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("finish_reason", pa.string()),
    ])
    out_dir.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(rows) // shards)
    for i in range(shards):
        shard = rows[i * per_shard : (i + 1) * per_shard]
        pq.write_table(pa.Table.from_pylist(shard, schema=schema), out_dir / f"part-{i:05d}.parquet")
    if errors:
        (out_dir / "errors").mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": ["x"], "error": ["timeout"]}), out_dir / "errors" / "part-00000.parquet")
    return out_dir


LLAMA_70B_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
    "tie_word_embeddings": False, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}
"""The shape of Llama-3.1-70B's config.json (70.55e9 parameters): a base the preflight sizes without weights."""


def write_model_config(out_dir: Path, config: dict) -> str:
    """A model directory holding only ``config.json``: enough for ``AutoConfig`` and the preflight."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config))
    return str(out_dir)
