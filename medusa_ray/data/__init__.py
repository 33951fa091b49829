"""Prompt readers: ShareGPT JSON, messages JSONL, Parquet, a local ``datasets`` dir -> normalized conversations.

``read_conversations(path)`` returns every record as either a ``Conversation`` (messages normalized to
``{"role": "system"|"user"|"assistant", "content": str}``, a stable id, its location in the input) or an
``InvalidRecord`` naming ``file:line`` (text formats) or ``file[row N]`` (Parquet, datasets) and why.
A broken line never stops the read; an unreadable file does (``UserError``). A directory is read as a
saved ``datasets`` dataset, as its ``*.parquet`` files, or as its ``*.json``/``*.jsonl`` prompt files.

Records may be shaped like ShareGPT (``{"conversations": [{"from": "human", "value": ...}]}``), like
OpenAI messages (``{"messages": [{"role": "user", "content": ...}]}``) or a bare prompt (``{"prompt": ...}``)
in any of the containers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medusa_ray.data.chat import Prompt, first_prompt
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


def _iter_files(directory: Path):
    """A directory of ShareGPT/JSONL files, each detected on its own (read in name order)."""
    for file in _prompt_files(directory):
        fmt = detect_format(file)
        yield from (_iter_json_array if fmt == "sharegpt" else _iter_jsonl)(file)


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


def _iter_json_array(path: Path) -> Iterator[tuple[str, Any, str | None, str | None]]:
    """Decode a JSON array element by element so every record knows its line number."""
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    pos = len(text) - len(text.lstrip(ws))
    if not text.startswith("[", pos):
        raise UserError(f"{path}: a ShareGPT file must be a JSON array of conversations")
    pos += 1
    line, counted = 1, 0

    def lineno(at: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, at)
        counted = at
        return line

    while True:
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Past a syntax error the array's structure is unknowable: stop with the exact spot.
            raise UserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
        yield f"{path}:{lineno(pos)}", obj, None, text[pos:end]
        pos = end
        while pos < len(text) and text[pos] in ws:
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            return
        else:
            where = lineno(pos)
            raise UserError(f"{path}:{where}: not valid JSON: expected ',' or ']' after a conversation")


def _iter_rows(rows: Iterator[dict], name: str) -> Iterator[tuple[str, Any, str | None, str | None]]:
    for i, row in enumerate(rows):
        yield f"{name}[row {i}]", row, None, None


def _iter_parquet(path: Path):
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        try:
            pf = pq.ParquetFile(file)
        except Exception as exc:
            raise UserError(f"{file}: not a readable Parquet file: {exc}") from None
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
    yield from _iter_rows(iter(ds), name)


def read_conversations(path: str | Path, fmt: str = "auto", limit: int | None = None) -> ReadResult:
    """Read and validate the first ``limit`` records of ``path``; see the module docstring."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {p} does not exist")
    fmt = detect_format(p) if fmt == "auto" else fmt
    if fmt not in FORMATS + ("files",):
        raise UserError(f"unknown input format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt in ("sharegpt", "jsonl") and p.is_dir():
        raise UserError(f"input {p} is a directory, but format {fmt} needs a file")
    readers = {"sharegpt": _iter_json_array, "jsonl": _iter_jsonl, "parquet": _iter_parquet, "hf": _iter_hf,
               "files": _iter_files}
    records = readers[fmt](p)

    result = ReadResult(format=fmt)
    seen: set[str] = set()
    for loc, record, error, raw in records:
        if limit is not None and result.records >= limit:
            break
        if error is None:
            try:
                messages = normalize_record(record)
            except ValueError as exc:
                error = str(exc)
        if error is not None:
            raw_text = raw if raw is not None else json.dumps(record, default=str, sort_keys=True)
            result.invalid.append(InvalidRecord(id=_raw_id(f"{loc}\n{raw_text}"), source=loc, reason=error))
            continue
        cid = conversation_id(messages)
        if cid in seen:
            result.duplicates += 1
            continue
        seen.add(cid)
        mode = record.get("mode") if record.get("mode") in ("chat", "completion") else None
        result.conversations.append(Conversation(id=cid, messages=messages, source=loc, mode=mode))
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
