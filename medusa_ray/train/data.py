"""Distilled Parquet -> training batches: the shards, their schema, tokenized rows and padded tensors.

Rendering and label masking live in ``medusa_ray.data.chat`` (eval scores held-out rows with the same code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medusa_ray import parquet
from medusa_ray.data import IGNORE_INDEX, BadRowError, load_tokenizer, tokenize_messages
from medusa_ray.errors import UserError

REQUIRED_COLUMNS = ("messages",)


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

    for f in files:
        names = parquet.read_schema(f).names  # readable, and nothing in it can run code when read
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UserError(f"{f}: missing column {missing[0]!r} (expected the distill output format)")


def tokenize_batch(batch: dict[str, np.ndarray], model: str, max_length: int) -> dict[str, np.ndarray]:
    """``id``, ``input_ids``, ``labels``, ``num_labels``, ``truncated``, ``retokenized`` of the usable rows, and
    ``bad``: one ``"id=...: reason"`` per row that cannot be templated or masked (skipped, for the caller to
    count). ``retokenized`` marks rows with an assistant reply stored without its generated token ids (older
    distill output, an endpoint that does not return them): its tokens are its text re-tokenized."""
    tokenizer = load_tokenizer(model)
    n = len(batch["messages"])
    modes = batch["mode"] if "mode" in batch else ["chat"] * n
    ids = batch["id"] if "id" in batch else [f"#{i}" for i in range(n)]
    out: dict[str, list] = {"id": [], "input_ids": [], "labels": [], "num_labels": [], "truncated": [],
                            "retokenized": [], "bad": []}
    for row_id, messages, mode in zip(ids, batch["messages"], modes):
        try:
            messages = [dict(m) for m in messages] if messages is not None else []
            ex = tokenize_messages(tokenizer, messages, mode or "chat", max_length)
        except (BadRowError, TypeError, ValueError) as exc:
            out["bad"].append(f"id={row_id}: {exc}")
            continue
        out["id"].append(str(row_id))
        out["input_ids"].append(np.asarray(ex.input_ids, dtype=np.int32))
        out["labels"].append(np.asarray(ex.labels, dtype=np.int32))
        out["num_labels"].append(sum(1 for x in ex.labels if x != IGNORE_INDEX))
        out["truncated"].append(ex.truncated)
        out["retokenized"].append(ex.retokenized)
    return {
        "id": out["id"],
        "input_ids": _ragged(out["input_ids"]),
        "labels": _ragged(out["labels"]),
        "num_labels": np.asarray(out["num_labels"], dtype=np.int64),
        "truncated": np.asarray(out["truncated"], dtype=bool),
        "retokenized": np.asarray(out["retokenized"], dtype=bool),
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
