"""Prompts for evaluation: the conversation up to its first assistant turn, from any prompt file distill reads.

Reads messages JSONL, ShareGPT JSON, distilled Parquet (a ``messages`` column) or a directory of either;
rows in completion mode become raw text prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from medusa_ray.errors import UserError

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

Prompt = list[dict[str, str]] | str  # chat messages, or raw text for completion-mode rows


def _normalise(row: Any, where: str) -> tuple[list[dict[str, str]], str]:
    """(messages, mode) from a messages row, a ShareGPT row or a ``{"prompt": ...}`` row."""
    if isinstance(row, list):
        return [dict(m) for m in row], "chat"
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object or a list of messages, got {type(row).__name__}")
    mode = row.get("mode") or "chat"
    if row.get("messages") is not None:
        return [dict(m) for m in row["messages"]], mode
    if row.get("conversations") is not None:
        try:
            return [{"role": _SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]], mode
        except (KeyError, TypeError) as exc:
            raise UserError(f"{where}: bad ShareGPT turn ({exc})") from None
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}], "completion" if mode == "completion" else "chat"
    raise UserError(f"{where}: no 'messages', 'conversations' or 'prompt' field")


def _rows(path: Path) -> Iterator[tuple[Any, str]]:
    if path.is_dir():
        files = sorted(path.glob("*.parquet")) or sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"prompts dir {path} has no .parquet or .jsonl files")
        for f in files:
            yield from _rows(f)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "messages" not in table.column_names:
            raise UserError(f"{path}: Parquet prompts need a 'messages' column")
        for i, row in enumerate(table.to_pylist()):
            yield row, f"{path} row {i}"
        return
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        for i, row in enumerate(data if isinstance(data, list) else [data]):
            yield row, f"{path} item {i}"
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield json.loads(line), f"{path}:{n}"
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def to_prompt(messages: list[dict[str, str]], mode: str, where: str) -> Prompt:
    """Everything before the first assistant turn (system + first user turn(s)); raw text in completion mode."""
    if mode == "completion":
        return messages[0]["content"]
    prefix = []
    for m in messages:
        if m.get("role") == "assistant":
            break
        prefix.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in prefix):
        raise UserError(f"{where}: no user turn before the first assistant turn")
    return prefix


def load_prompts(path: str, limit: int) -> list[Prompt]:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"prompts file {p} does not exist")
    prompts: list[Prompt] = []
    for row, where in _rows(p):
        messages, mode = _normalise(row, where)
        prompts.append(to_prompt(messages, mode, where))
        if len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"prompts file {p} holds no prompts")
    return prompts
