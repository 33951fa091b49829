"""Chat rendering shared by every stage that reads conversations: prompts, token ids and assistant labels.

Chat rows are rendered with the base tokenizer's chat template. Each assistant turn's character span is
found by rendering the conversation up to the turn with ``add_generation_prompt=True`` (where the reply
starts) and up to and including the turn (where it ends, end-of-turn token included, trailing template
whitespace not), and tokens are assigned to spans by ``return_offsets_mapping``. Completion rows are raw
``prompt + completion`` text with labels on the completion. Everything else is ``-100``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
"""The label of a token no loss is computed on (PyTorch's cross-entropy default)."""

Prompt = list[dict[str, str]] | str
"""Chat messages, or raw text for completion-mode rows."""


class BadRowError(ValueError):
    """A training row that cannot be used; the message names the row."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


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


def first_prompt(messages: list[dict[str, str]], mode: str) -> Prompt:
    """What the model is asked first: everything before the first assistant turn; raw text in completion
    mode. Raises ValueError when there is no user turn before the first answer."""
    if mode == "completion":
        return messages[0]["content"]
    prefix = []
    for m in messages:
        if m["role"] == "assistant":
            break
        prefix.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in prefix):
        raise ValueError("no user turn before the first assistant turn")
    return prefix
