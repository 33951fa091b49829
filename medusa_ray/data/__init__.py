"""Prompt readers: ShareGPT JSON, messages JSONL, Parquet, a local ``datasets`` dir -> normalized conversations.

``read_conversations(path)`` returns every record as either a ``Conversation`` (messages normalized to
``{"role": "system"|"user"|"assistant", "content": str}``, a stable id, its location in the input) or an
``InvalidRecord`` naming ``file:line`` (text formats) or ``file[row N]`` (Parquet, datasets) and why.
A broken line never stops the read; an unreadable file does (``UserError``). A directory is read as a
saved ``datasets`` dataset, as its ``*.parquet`` files, or as its ``*.json``/``*.jsonl`` prompt files.

Records may be shaped like ShareGPT (``{"conversations": [{"from": "human", "value": ...}]}``), like
OpenAI messages (``{"messages": [{"role": "user", "content": ...}]}``) or a bare prompt (``{"prompt": ...}``)
in any of the containers.

Every reader streams: ``input_units(path)`` lists the files (or saved dataset) an input consists of, and
``iter_unit(unit)`` yields its records one at a time, so distill's Ray Data source (``distill/source.py``)
and the small driver-side reads here share one parser and one memory profile, whatever the input's size.
A ShareGPT file (one JSON array, often on a single line) is decoded element by element from 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

# The package face also serves chat rendering and label masking to train, eval and the drafters.
from medusa_ray.data.chat import (  # noqa: F401
    IGNORE_INDEX,
    BadRowError,
    Prompt,
    first_prompt,
    load_tokenizer,
    tokenize_messages,
)
from medusa_ray.errors import UserError

FORMATS = ("sharegpt", "jsonl", "parquet", "hf")

# ShareGPT speakers -> chat roles. Anything else (tool calls, observations...) is rejected, not guessed.
_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list[dict[str, str]]
    source: str
    """Where the record came from: ``file:line`` or ``file[row N]``."""
    mode: str | None = None
    """``chat`` or ``completion`` when the record says (distilled Parquet does); None: the config decides."""


@dataclass(frozen=True)
class InvalidRecord:
    id: str
    source: str
    reason: str


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    invalid: list[InvalidRecord] = field(default_factory=list)
    duplicates: int = 0
    """Records identical to an earlier one (same id): read once, distilled once."""
    format: str = ""

    @property
    def records(self) -> int:
        return len(self.conversations) + len(self.invalid) + self.duplicates


def conversation_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a normalized conversation: the same text gives the same id in any input format."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


SAMPLE_SEPARATOR = "#s"
"""Between a conversation's id and the sample index in the ids of its extra replies (``distill.samples_per_prompt``)."""


def sample_id(prompt_id: str, sample: int) -> str:
    """The row id of reply ``sample`` to conversation ``prompt_id``: sample 0 keeps the conversation's id (the
    id every row had before there were samples), sample k is ``<id>#s<k>``."""
    return prompt_id if sample == 0 else f"{prompt_id}{SAMPLE_SEPARATOR}{sample}"


def prompt_id_of(row_id: str) -> str:
    """The conversation a row id answers: ``row_id`` less a ``#s<k>`` sample suffix (for rows without a
    ``prompt_id`` column)."""
    head, sep, tail = row_id.rpartition(SAMPLE_SEPARATOR)
    return head if sep and head and tail.isdigit() and tail[0] != "0" else row_id


def _raw_id(text: str) -> str:
    # Invalid records get an id too, so a re-run recognises them as already reported.
    return "invalid-" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:24]


def normalize_record(record: Any) -> list[dict[str, str]]:
    """One input record -> normalized messages; raises ValueError with a short reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if "messages" in record and record["messages"] is not None:
        turns, key = record["messages"], "messages"
    elif "conversations" in record and record["conversations"] is not None:
        turns, key = record["conversations"], "conversations"
    elif isinstance(record.get("prompt"), str):
        turns, key = [{"role": "user", "content": record["prompt"]}], "prompt"
    else:
        raise ValueError("no 'messages', 'conversations' or 'prompt' field")
    if hasattr(turns, "tolist"):  # numpy arrays from datasets/pandas
        turns = turns.tolist()
    if not isinstance(turns, list):
        raise ValueError(f"'{key}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise ValueError("empty conversation")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"{key}[{i}] must be an object, got {type(turn).__name__}")
        speaker = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(speaker, str):
            raise ValueError(f"{key}[{i}] has no 'role'/'from'")
        role = _ROLES.get(speaker.strip().lower())
        if role is None:
            raise ValueError(f"{key}[{i}] has unsupported role {speaker!r}")
        if not isinstance(content, str):
            raise ValueError(f"{key}[{i}] content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no user turn")
    return messages


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {p} does not exist")
    if p.is_dir():
        if any((p / m).exists() for m in _HF_MARKERS):
            return "hf"
        if any(p.glob("*.parquet")):
            return "parquet"
        if _prompt_files(p):
            return "files"
        raise UserError(f"input directory {p} holds no saved `datasets` dataset, *.parquet, *.json or *.jsonl files")
    if p.suffix == ".parquet":
        return "parquet"
    if p.suffix == ".jsonl":
        return "jsonl"
    with p.open("r", encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return "sharegpt"
    if head.startswith("{"):
        return "jsonl"
    raise UserError(f"cannot tell the format of {p}; set distill.format (one of {', '.join(FORMATS)})")


def _prompt_files(directory: Path) -> list[Path]:
    return sorted(f for f in directory.iterdir() if f.suffix in (".json", ".jsonl") and f.is_file())


@dataclass(frozen=True)
class InputUnit:
    """One file of an input (or a whole saved ``datasets`` dir) and the reader for it."""

    path: str
    format: str
    """``sharegpt`` | ``jsonl`` | ``parquet`` | ``hf``."""


def input_units(path: str | Path, fmt: str = "auto") -> tuple[str, list[InputUnit]]:
    """(the input's format, its units in read order); raises UserError for a missing or unreadable input."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {p} does not exist")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS + ("files",):
        raise UserError(f"unknown input format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt in ("sharegpt", "jsonl") and p.is_dir():
        raise UserError(f"input {p} is a directory, but format {fmt} needs a file")
    if fmt == "files":
        return fmt, [InputUnit(str(f), detect_format(f)) for f in _prompt_files(p)]
    if fmt == "parquet" and p.is_dir():
        return fmt, [InputUnit(str(f), "parquet") for f in sorted(p.glob("*.parquet"))]
    return fmt, [InputUnit(str(p), fmt)]


def iter_unit(unit: InputUnit) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """(location, record or None, error or None, raw text or None) for every record of ``unit``."""
    readers = {"sharegpt": _iter_json_array, "jsonl": _iter_jsonl, "parquet": _iter_parquet, "hf": _iter_hf}
    return readers[unit.format](Path(unit.path))


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """(location, record or None, error, raw text) per non-blank line."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                yield loc, json.loads(line), None, line
            except json.JSONDecodeError as exc:
                yield loc, None, f"not valid JSON: {exc.msg} (column {exc.colno})", line


_CHUNK_CHARS = 1 << 20
_WS = " \t\r\n"


class _ArrayStream:
    """A JSON array decoded element by element from a file read in chunks: memory is one element plus a chunk,
    not the file (ShareGPT dumps run to gigabytes, often on one line). Tracks line and column for messages."""

    def __init__(self, f, path: Path):
        self.f, self.path = f, path
        self.buf, self.pos, self.eof = "", 0, False
        self.buf_line, self.buf_col = 1, 0  # where buf[0] sits in the file
        self.counted, self.line = 0, 1  # line number at buf[counted]

    def more(self) -> bool:
        """Drop what was consumed, append a chunk; False at the end of the file."""
        if self.eof:
            return False
        consumed = self.buf[: self.pos]
        newlines = consumed.count("\n")
        self.line += consumed.count("\n", self.counted)
        self.counted = 0
        if newlines:
            self.buf_line += newlines
            self.buf_col = self.pos - consumed.rfind("\n") - 1
        else:
            self.buf_col += self.pos
        chunk = self.f.read(_CHUNK_CHARS)
        self.buf, self.pos = self.buf[self.pos:] + chunk, 0
        self.eof = not chunk
        return bool(chunk)

    def line_at(self, at: int) -> int:
        self.line += self.buf.count("\n", self.counted, at)
        self.counted = at
        return self.line

    def skip_ws(self) -> str:
        """The next non-blank character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def where(self, lineno: int, colno: int) -> str:
        """``path:line:col`` of a JSONDecodeError position in the current buffer."""
        return f"{self.path}:{self.buf_line + lineno - 1}:{colno + (self.buf_col if lineno == 1 else 0)}"


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """Decode a JSON array element by element so every record knows its line number."""
    decoder = json.JSONDecoder()
    with path.open("r", encoding="utf-8", errors="replace") as f:
        s = _ArrayStream(f, path)
        if s.skip_ws() != "[":
            raise UserError(f"{path}: a ShareGPT file must be a JSON array of conversations")
        s.pos += 1
        if s.skip_ws() == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(s.buf, s.pos)
                if end == len(s.buf) and not s.eof:
                    raise json.JSONDecodeError("element may continue", s.buf, end)
            except json.JSONDecodeError as exc:
                where = s.where(exc.lineno, exc.colno)  # before more() moves the buffer
                if s.more():
                    continue  # the element runs past this chunk: decode it again with more text
                # Past a syntax error the array's structure is unknowable: stop with the exact spot.
                raise UserError(f"{where}: not valid JSON: {exc.msg}") from None
            yield f"{path}:{s.line_at(s.pos)}", obj, None, s.buf[s.pos:end]
            s.pos = end
            following = s.skip_ws()
            if following == ",":
                s.pos += 1
                s.skip_ws()
            elif following == "]":
                return
            else:
                raise UserError(f"{path}:{s.line_at(s.pos)}: not valid JSON: expected ',' or ']' after a "
                                "conversation")


def _iter_rows(rows: Iterator[dict], name: str) -> Iterator[tuple[str, Any, str | None, str | None]]:
    for i, row in enumerate(rows):
        yield f"{name}[row {i}]", row, None, None


def _iter_parquet(file: Path):
    from medusa_ray import parquet

    parquet.read_schema(file)  # readable, and nothing in it can run code when read
    pf = parquet.open_file(file)
    columns = [c for c in ("messages", "conversations", "prompt") if c in pf.schema_arrow.names]
    if columns and "mode" in pf.schema_arrow.names:
        columns.append("mode")
    if not columns:
        raise UserError(f"{file}: no 'messages' (or 'conversations'/'prompt') column; has {pf.schema_arrow.names}")
    offset = 0
    for batch in pf.iter_batches(columns=columns, batch_size=1024):
        for i, row in enumerate(batch.to_pylist()):
            yield f"{file}[row {offset + i}]", row, None, None
        offset += batch.num_rows


def _iter_hf(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"{path}: cannot load the saved dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            split = "train"
        elif len(ds) == 1:
            split = next(iter(ds))
        else:
            raise UserError(f"{path}: dataset has splits {list(ds)} and none is 'train'; save the split to use")
        ds = ds[split]
        name = f"{path}[{split}]"
    else:
        name = str(path)
    from medusa_ray import parquet

    parquet.check_schema(ds.data.schema, name)  # its Arrow files are read like Parquet: same hazard
    yield from _iter_rows(iter(ds), name)


def to_record(loc: str, record: Any, error: str | None, raw: str | None) -> Conversation | InvalidRecord:
    """One raw record -> a normalized conversation with its id, or the reason it is invalid."""
    if error is None:
        try:
            messages = normalize_record(record)
        except ValueError as exc:
            error = str(exc)
    if error is not None:
        raw_text = raw if raw is not None else json.dumps(record, default=str, sort_keys=True)
        return InvalidRecord(id=_raw_id(f"{loc}\n{raw_text}"), source=loc, reason=error)
    mode = record.get("mode") if record.get("mode") in ("chat", "completion") else None
    return Conversation(id=conversation_id(messages), messages=messages, source=loc, mode=mode)


def iter_records(units: list[InputUnit], limit: int | None = None) -> Iterator[Conversation | InvalidRecord]:
    """Every record of ``units`` in order (the first ``limit``), duplicates included."""
    count = 0
    for unit in units:
        for raw in iter_unit(unit):
            if limit is not None and count >= limit:
                return
            count += 1
            yield to_record(*raw)


def read_conversations(path: str | Path, fmt: str = "auto", limit: int | None = None) -> ReadResult:
    """Read and validate the first ``limit`` records of ``path`` into memory: for small inputs (eval prompts,
    tests). Distillation streams its input through Ray Data instead (``distill/source.py``)."""
    fmt, units = input_units(path, fmt)
    result = ReadResult(format=fmt)
    seen: set[str] = set()
    for record in iter_records(units, limit):
        if isinstance(record, InvalidRecord):
            result.invalid.append(record)
        elif record.id in seen:
            result.duplicates += 1
        else:
            seen.add(record.id)
            result.conversations.append(record)
    return result


def read_prompts(path: str | Path, limit: int, mode: str = "chat") -> list[Prompt]:
    """The first ``limit`` prompts of any input distill reads: each conversation up to its first answer
    (raw text for completion-mode rows). Records are read as distill reads them; a bad one is one line."""
    result = read_conversations(path, limit=limit)
    if result.invalid:
        bad = result.invalid[0]
        raise UserError(f"{bad.source}: {bad.reason}")
    prompts: list[Prompt] = []
    for conversation in result.conversations:
        try:
            prompts.append(first_prompt(conversation.messages, conversation.mode or mode))
        except ValueError as exc:
            raise UserError(f"{conversation.source}: {exc}") from None
    if not prompts:
        raise UserError(f"prompts file {path} holds no prompts")
    return prompts
