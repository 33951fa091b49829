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
    retokenized: bool = False
    """An assistant reply came without its generated ids (rows distilled before they were kept, endpoints that
    do not return them): its tokens are its text re-tokenized, which may differ from what the model generated."""


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


_REPLY_MARK = "@@medusa-ray-reply-0b5e@@"
"""Stands in for a reply's content when the template does not render the content verbatim (trims it, say):
what the template writes after it is where the reply's region ends."""


def _turn_spans(tokenizer, messages: list[dict[str, str]], text: str) -> list[tuple[int, int | None, int]]:
    """Per assistant turn, character offsets in ``text``: (reply start, reply end, label end). The reply is the
    region the generated tokens fill (None for its end where the template's rendering cannot be placed); the
    label end is past the end-of-turn token the template writes after it (trailing template whitespace not)."""
    spans: list[tuple[int, int | None, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and text.startswith(through)):
            # A template that rewrites earlier turns (e.g. drops past reasoning): fall back to the
            # reply text itself, searched after the previous reply.
            start = text.find(message["content"], spans[-1][2] if spans else 0)
            if start < 0:
                raise BadRowError(f"assistant turn {i} not found in the rendered chat template")
            spans.append((start, start + len(message["content"]), start + len(message["content"])))
            continue
        end = len(through)
        while end > len(before) and through[end - 1].isspace():
            end -= 1
        reply_end: int | None = None
        if through.startswith(message["content"], len(before)):
            reply_end = len(before) + len(message["content"])
        else:
            marked = tokenizer.apply_chat_template(
                messages[:i] + [{"role": "assistant", "content": _REPLY_MARK}], tokenize=False)
            at = marked.find(_REPLY_MARK)
            after = marked[at + len(_REPLY_MARK):] if at >= 0 else None
            if after is not None and through.endswith(after) and len(through) - len(after) >= len(before):
                reply_end = len(through) - len(after)
        spans.append((len(before), reply_end, end))
    return spans


def _assistant_spans(tokenizer, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of the assistant replies (with their end-of-turn token) inside ``text``."""
    return [(start, end) for start, _, end in _turn_spans(tokenizer, messages, text)]


def _reply_ids(message: dict[str, Any], i: int, vocab: int) -> list[int] | None:
    """An assistant message's generated token ids (``token_ids``), or None where the row has none."""
    ids = message.get("token_ids")
    if ids is None:
        return None
    if hasattr(ids, "tolist"):  # numpy arrays from Ray Data / pandas
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise BadRowError(f"messages[{i}].token_ids is not a list of ids of this tokenizer (0..{vocab - 1})")
    return list(ids)


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (detokenization drops them from a reply's text)."""
    found = set(tokenizer.all_special_ids)
    for token_id, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(token, "special", False):
            found.add(int(token_id))
    return frozenset(found)


def _labels_in(spans: list[tuple[int, int]], offsets, base: int, ids: list[int]) -> list[int]:
    """Labels of tokens at character ``offsets`` (relative to ``base``): their id inside a span, else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for t, (start, end) in enumerate(offsets):
        if end <= start:
            continue  # tokens the tokenizer added itself (BOS) have empty offsets
        start += base
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        if span_i < len(spans) and start >= spans[span_i][0]:
            labels[t] = ids[t]
    return labels


def tokenize_messages(tokenizer, messages: list[dict[str, Any]], mode: str, max_length: int) -> Example:
    """Token ids and labels (``-100`` off the assistant's tokens) for one conversation.

    An assistant message with ``token_ids`` (what the model generated, from distill) is trained on exactly those
    ids: the conversation is rendered with the chat template, the text around the replies is tokenized, and each
    reply's region is filled with its ids. The end-of-turn token the template writes after a reply is kept once:
    where the ids already end with it (the model generated it and the engine returned it), it is not repeated.
    Messages without ids (older rows) are re-tokenized from their text, the whole row in one pass when none of
    its replies has ids, exactly as before ids were kept (``Example.retokenized``)."""
    _check_messages(messages, mode)
    vocab = len(tokenizer)
    replies = [_reply_ids(m, i, vocab) if m["role"] == "assistant" else None for i, m in enumerate(messages)]
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]  # what the template sees
    retokenized = any(r is None for r, m in zip(replies, messages) if m["role"] == "assistant")
    if mode == "completion":
        prompt, completion = messages[0]["content"], messages[1]["content"]
        if replies[1] is not None:
            # As the engine served it: the prompt as the tokenizer encodes it (BOS included), then the ids.
            ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) + replies[1]
            labels = [IGNORE_INDEX] * (len(ids) - len(replies[1])) + replies[1]
            return Example(ids[:max_length], labels[:max_length], len(ids) > max_length, False)
        text = prompt + completion
        spans = [(len(prompt), len(text))]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    else:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        turns = _turn_spans(tokenizer, messages, text)
        assistant_ids = [r for r, m in zip(replies, messages) if m["role"] == "assistant"]
        if any(r is not None for r in assistant_ids):
            return _spliced(tokenizer, text, turns, assistant_ids, max_length, retokenized)
        spans = [(start, end) for start, _, end in turns]
        # The template already wrote any BOS; adding special tokens again would double it.
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = _labels_in(spans, enc["offset_mapping"], 0, ids)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated, True)


def _spliced(tokenizer, text: str, turns: list[tuple[int, int | None, int]], replies: list[list[int] | None],
             max_length: int, retokenized: bool) -> Example:
    """The rendered chat with each reply that has ids replaced by them (see ``tokenize_messages``)."""
    special = _special_ids(tokenizer)
    # Labelled character spans of the text that is tokenized: whole turns re-tokenized, and the end-of-turn
    # part of turns filled with ids.
    spans = []
    for (start, reply_end, label_end), reply in zip(turns, replies):
        if reply is None or reply_end is None:
            spans.append((start, label_end))
        elif label_end > reply_end:
            spans.append((reply_end, label_end))
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    tail: list[int] = []  # the trailing special tokens of the reply just filled in

    def add_text(a: int, b: int) -> None:
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
        seg = list(enc["input_ids"])
        seg_labels = _labels_in(spans, enc["offset_mapping"], a, seg)
        # The model generated the end-of-turn token the template writes next: keep its copy, drop the template's.
        skip = max((k for k in range(1, min(len(tail), len(seg)) + 1) if tail[-k:] == seg[:k]), default=0)
        ids.extend(seg[skip:])
        labels.extend(seg_labels[skip:])

    for (start, reply_end, _), reply in zip(turns, replies):
        if reply is None or reply_end is None:
            retokenized = True
            continue  # its text stays in the text around it
        add_text(pos, start)
        ids.extend(reply)
        labels.extend(reply)
        pos = reply_end
        n = 0
        while n < len(reply) and reply[len(reply) - 1 - n] in special:
            n += 1
        tail = reply[len(reply) - n:]
    add_text(pos, len(text))
    return Example(ids[:max_length], labels[:max_length], len(ids) > max_length, retokenized)


def _check_messages(messages: Any, mode: str) -> None:
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
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
