"""Distilled Parquet -> token ids + labels, with labels only on what the assistant said.

Chat rows are rendered with the base tokenizer's chat template. Each assistant turn's character span is
found by rendering the conversation up to the turn with ``add_generation_prompt=True`` (where the reply
starts) and up to and including the turn (where it ends, end-of-turn token included, trailing template
whitespace not), and tokens are assigned to spans by ``return_offsets_mapping``. Completion rows are raw
``prompt + completion`` text with labels on the completion. Everything else is ``-100``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medusa_ray.errors import UserError
from medusa_ray.model.loss import IGNORE_INDEX

REQUIRED_COLUMNS = ("messages",)


class BadRowError(ValueError):
    """A training row that cannot be used; the message names the row."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def list_data_files(data_dir: str) -> list[str]:
    """The distill shards: ``*.parquet`` directly in ``data_dir`` (``errors/`` and temp files excluded)."""
    path = Path(data_dir)
    if not path.is_dir():
        raise UserError(f"train data {data_dir} is not a directory (run distill first or set train.data)")
    files = sorted(str(p) for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"train data {data_dir} holds no *.parquet files (run distill first or set train.data)")
    return files


def check_schema(files: list[str]) -> None:
    """Fail before any worker starts when a shard lacks a column we need (reads footers only)."""
    import pyarrow.parquet as pq

    for f in files:
        try:
            names = pq.read_schema(f).names
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"{f}: not a readable Parquet file: {exc}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UserError(f"{f}: missing column {missing[0]!r} (expected the distill output format)")


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def _assistant_spans(tokenizer, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant replies (with their end-of-turn token) inside ``text``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            # A template that rewrites earlier turns (e.g. drops past reasoning): fall back to the
            # reply text itself, searched after the previous reply.
            start = text.find(message["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise BadRowError(f"assistant turn {i} not found in the rendered chat template")
            spans.append((start, start + len(message["content"])))
            continue
        end = len(through)
        while end > len(before) and through[end - 1].isspace():
            end -= 1
        spans.append((len(before), end))
    return spans


def tokenize_messages(tokenizer, messages: list[dict[str, str]], mode: str, max_length: int) -> Example:
    """Token ids and labels (``-100`` off the assistant's tokens) for one conversation."""
    _check_messages(messages, mode)
    if mode == "completion":
        prompt, completion = messages[0]["content"], messages[1]["content"]
        text = prompt + completion
        spans = [(len(prompt), len(text))]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = _assistant_spans(tokenizer, messages, text)
        # The template already wrote any BOS; adding special tokens again would double it.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if end <= start:
            continue  # tokens the tokenizer added itself (BOS) have empty offsets
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        if span_i < len(spans) and start >= spans[span_i][0]:
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated)


def _check_messages(messages: Any, mode: str) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadRowError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRowError(f"messages[{i}] is not {{'role': str, 'content': str}}")
    if mode == "completion":
        if [m["role"] for m in messages] != ["user", "assistant"]:
            raise BadRowError("a completion row must be exactly [user prompt, assistant completion]")
    elif mode != "chat":
        raise BadRowError(f"mode {mode!r} is neither 'chat' nor 'completion'")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRowError("no assistant turn to train on")


def tokenize_batch(batch: dict[str, np.ndarray], model: str, max_length: int) -> dict[str, np.ndarray]:
    """``input_ids``, ``labels``, ``num_labels``, ``truncated`` of the usable rows, and ``bad``: one
    ``"id=...: reason"`` per row that cannot be templated or masked (skipped, for the caller to count)."""
    tokenizer = load_tokenizer(model)
    n = len(batch["messages"])
    modes = batch["mode"] if "mode" in batch else ["chat"] * n
    ids = batch["id"] if "id" in batch else [f"#{i}" for i in range(n)]
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_labels": [], "truncated": [], "bad": []}
    for row_id, messages, mode in zip(ids, batch["messages"], modes):
        try:
            messages = [dict(m) for m in messages] if messages is not None else []
            ex = tokenize_messages(tokenizer, messages, mode or "chat", max_length)
        except (BadRowError, TypeError, ValueError) as exc:
            out["bad"].append(f"id={row_id}: {exc}")
            continue
        out["input_ids"].append(np.asarray(ex.input_ids, dtype=np.int32))
        out["labels"].append(np.asarray(ex.labels, dtype=np.int32))
        out["num_labels"].append(sum(1 for x in ex.labels if x != IGNORE_INDEX))
        out["truncated"].append(ex.truncated)
    return {
        "input_ids": _ragged(out["input_ids"]),
        "labels": _ragged(out["labels"]),
        "num_labels": np.asarray(out["num_labels"], dtype=np.int64),
        "truncated": np.asarray(out["truncated"], dtype=bool),
        "bad": out["bad"],
    }


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    obj = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):  # one by one: equal-length rows would otherwise become a 2-D assignment
        obj[i] = a
    return obj


def collate(input_ids, labels, pad_id: int):
    """Right-pad a list of ragged rows into ``input_ids``, ``attention_mask``, ``labels`` tensors."""
    import torch

    length = max(len(x) for x in input_ids)
    n = len(input_ids)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    lab = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, : len(x)] = torch.as_tensor(np.asarray(x), dtype=torch.long)
        lab[i, : len(y)] = torch.as_tensor(np.asarray(y), dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask, lab
