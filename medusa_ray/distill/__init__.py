"""distill: regenerate every assistant turn with the base model (Ray Data -> Ray Serve vLLM -> Parquet).

``run(cfg)`` reads the prompts (``medusa_ray.data``), skips conversations already in ``distill.output_dir``,
and regenerates the rest in *passes*: each pass is one Ray Data execution of a ``ray.data.llm`` processor
over every request that is ready — round r of a multi-turn conversation is ready once the model has
answered round r-1, a retry once its attempt failed. A conversation is written (in Parquet shards of
``distill.shard_size``) as soon as its last round is answered, so a killed run loses only in-flight work
and a re-run redoes exactly that. Passes, not shards, are the unit of execution because each Ray Data
execution pays seconds of actor start-up; a whole wave of conversations shares them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medusa_ray.cluster import init_ray
from medusa_ray.config import Config
from medusa_ray.data import Conversation, read_conversations
from medusa_ray.distill.engine import Engine, open_engine
from medusa_ray.distill.output import ShardWriter, existing_ids, existing_models, remove_stale_temp_files
from medusa_ray.errors import UserError
from medusa_ray.locks import hold
from medusa_ray.writable import check_writable

log = logging.getLogger(__name__)

# Conversations per wave (in shards): bounds driver memory and the work a kill can lose.
_WAVE_SHARDS = 16
_MAX_BACKOFF_S = 60.0


@dataclass
class DistillSummary:
    rows_in: int
    """Records read from the input (after ``distill.limit``), valid or not."""
    rows_out: int
    """Conversations written as training rows by this run."""
    failed: int
    truncated: int
    """Of ``rows_out``: conversations ending in a reply cut at ``max_tokens`` (kept, ``finish_reason: length``)."""
    empty: int
    invalid: int
    skipped: int
    """Conversations already in the output dir (data or errors) from an earlier run."""
    duplicates: int
    generated_tokens: int
    """Every token the engine generated in this run, retries included."""
    tokens_per_s: float
    elapsed_s: float
    """Generation wall time: first request to last reply (engine start-up excluded)."""
    startup_s: float
    shards: int
    output_dir: str
    nodes: list[str] = field(default_factory=list)
    """Ray node ids of the vLLM replicas that generated (empty for an endpoint)."""

    def table(self) -> str:
        rows = [
            ("conversations in", self.rows_in),
            ("already done (skipped)", self.skipped),
            ("duplicates", self.duplicates),
            ("invalid", self.invalid),
            ("written", self.rows_out),
            ("  of which truncated", self.truncated),
            ("failed", self.failed),
            ("empty", self.empty),
            ("generated tokens", self.generated_tokens),
            ("tokens/s", f"{self.tokens_per_s:.1f}"),
            ("generation time (s)", f"{self.elapsed_s:.1f}"),
            ("engine start-up (s)", f"{self.startup_s:.1f}"),
            ("shards written", self.shards),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"distill -> {self.output_dir}"] + [f"  {k:<{width}}  {v:>10}" for k, v in rows]
        return "\n".join(lines)


@dataclass
class _Work:
    """One conversation in flight: its rounds to answer and what the model has said so far."""

    conv: Conversation
    rounds: list[list[dict[str, str]]]
    history: list[dict[str, str]] = field(default_factory=list)
    round: int = 0
    attempt: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""


def plan_rounds(messages: list[dict[str, str]], mode: str) -> list[list[dict[str, str]]]:
    """The messages to send before each answer; the source's own assistant turns are dropped.

    A round is the run of system/user turns up to where the source had an assistant reply (or its end).
    In completion mode there is one round: the first user turn as raw text.
    """
    if mode == "completion":
        first = next(m for m in messages if m["role"] == "user")
        return [[{"role": "user", "content": first["content"]}]]
    rounds, pending = [], []
    for m in messages:
        if m["role"] != "assistant":
            pending.append(m)
        elif any(p["role"] == "user" for p in pending):
            rounds.append(pending)
            pending = []
        # An assistant turn with no user turn before it (a greeting) answers nothing: dropped.
    if any(p["role"] == "user" for p in pending):
        rounds.append(pending)
    return rounds


def _request_seed(seed: int, work: _Work) -> int:
    # Per request and attempt, so a retry samples anew while a re-run reproduces the same outputs.
    key = f"{seed}:{work.conv.id}:{work.round}:{work.attempt}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _request(cfg: Config, engine: Engine, work: _Work) -> dict[str, Any]:
    d = cfg.distill
    body: dict[str, Any] = {
        "model": engine.model_id,
        "temperature": d.temperature,
        "top_p": d.top_p,
        "max_tokens": d.max_tokens,
        "seed": d.seed if d.temperature == 0 else _request_seed(d.seed, work),
        "stream": False,
    }
    if d.mode == "chat":
        body["messages"] = work.history + work.rounds[work.round]
    else:
        body["prompt"] = work.rounds[0][0]["content"]
    return body


def _run_pass(cfg: Config, engine: Engine, works: list[_Work]) -> Iterator[tuple[_Work, dict[str, Any]]]:
    """One Ray Data execution over ``works``; yields (work, reply) as replies stream in."""
    import ray

    items = [{"key": str(i), "request": json.dumps(_request(cfg, engine, w))} for i, w in enumerate(works)]
    blocks = max(1, -(-len(items) // cfg.distill.batch_size))
    ds = engine.processor()(ray.data.from_items(items, override_num_blocks=blocks))
    for row in ds.iter_rows():
        work = works[int(row["key"])]
        inference_error = row.get("__inference_error__") or ""
        if inference_error:
            # Rows the processor could not send at all skip our postprocess and carry only the error.
            yield work, {"text": "", "finish_reason": "", "prompt_tokens": 0, "completion_tokens": 0,
                         "error": str(inference_error)}
        else:
            yield work, {k: row[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "error")}


class _Run:
    """Counters and outcome handling of one ``run``."""

    def __init__(self, cfg: Config, writer: ShardWriter):
        self.cfg = cfg
        self.writer = writer
        self.counts = {"written": 0, "failed": 0, "truncated": 0, "empty": 0}
        self.generated_tokens = 0

    def _record_error(self, work: _Work, reason: str, error: str) -> None:
        self.counts[reason] += 1
        self.writer.add_error({
            "id": work.conv.id, "source": work.conv.source, "reason": reason, "error": error,
            "round": work.round, "attempts": work.attempt + 1, "model": self.cfg.model,
        })

    def _retry(self, work: _Work) -> bool:
        if work.attempt < self.cfg.distill.max_retries:
            work.attempt += 1
            return True
        return False

    def handle(self, work: _Work, reply: dict[str, Any]) -> bool:
        """Apply one reply; returns True when ``work`` needs another request."""
        d = self.cfg.distill
        self.generated_tokens += int(reply["completion_tokens"] or 0)
        if reply["error"]:
            if self._retry(work):
                return True
            self._record_error(work, "failed", reply["error"])
            return False
        if not reply["text"].strip():
            self._record_error(work, "empty", f"the model answered round {work.round} with nothing")
            return False
        if reply["finish_reason"] == "length":
            # A reply cut at max_tokens is still exactly what the model says, and the longest replies are most
            # of the tokens: keep it. The conversation ends here; a later round would follow a cut-off reply.
            self.counts["truncated"] += 1
            work.rounds = work.rounds[: work.round + 1]
        work.history += work.rounds[work.round] + [{"role": "assistant", "content": reply["text"]}]
        work.prompt_tokens += int(reply["prompt_tokens"] or 0)
        work.completion_tokens += int(reply["completion_tokens"] or 0)
        work.finish_reason = reply["finish_reason"]
        work.round += 1
        work.attempt = 0
        if work.round < len(work.rounds):
            return True
        self.counts["written"] += 1
        self.writer.add_row({
            "id": work.conv.id,
            "messages": work.history,
            "mode": d.mode,
            "model": self.cfg.model,
            "sampling": {"temperature": d.temperature, "top_p": d.top_p, "max_tokens": d.max_tokens, "seed": d.seed},
            "prompt_tokens": work.prompt_tokens,
            "completion_tokens": work.completion_tokens,
            "finish_reason": work.finish_reason,
        })
        return False

    def wave(self, engine: Engine, works: list[_Work]) -> None:
        ready, pass_no = works, 0
        while ready:
            pass_no += 1
            attempt = max(w.attempt for w in ready)
            if attempt:
                wait = min(self.cfg.distill.retry_backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
                log.info("pass %d retries failed requests: waiting %.0f s first", pass_no, wait)
                time.sleep(wait)
            log.info("pass %d: %d requests", pass_no, len(ready))
            ready = [w for w, reply in _run_pass(self.cfg, engine, ready) if self.handle(w, reply)]


def run(cfg: Config) -> DistillSummary:
    d = cfg.distill
    if not d.input:
        raise UserError("distill.input is not set (prompts file or directory)")
    if "://" in d.output_dir:
        raise UserError(f"distill.output_dir={d.output_dir}: must be a local or shared-filesystem path (shards are "
                        "renamed into place when complete, which object storage cannot do atomically)")
    check_writable(d.output_dir, "distill.output_dir")
    # One run per output dir: a second one would delete this one's in-flight shards and repeat its work.
    with hold(d.output_dir, "distill"):
        return _distill(cfg)


def _distill(cfg: Config) -> DistillSummary:
    d = cfg.distill
    read = read_conversations(d.input, d.format, d.limit)
    for bad in read.invalid:
        log.warning("invalid input %s: %s", bad.source, bad.reason)

    out = Path(d.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    other_models = existing_models(out) - {cfg.model}
    if other_models:
        raise UserError(f"{out} already holds rows distilled from {sorted(other_models)}, not {cfg.model}; "
                        "use another distill.output_dir")
    data_ids, error_ids = existing_ids(out)
    done = data_ids | error_ids
    pending = [c for c in read.conversations if c.id not in done]
    new_invalid = [r for r in read.invalid if r.id not in done]
    skipped = len(read.conversations) - len(pending) + len(read.invalid) - len(new_invalid)
    log.info("%d records in %s (%s): %d to distill, %d already done, %d invalid, %d duplicates",
             read.records, d.input, read.format, len(pending), skipped, len(read.invalid), read.duplicates)

    writer = ShardWriter(out, d.shard_size)
    for bad in new_invalid:
        writer.add_error({"id": bad.id, "source": bad.source, "reason": "invalid", "error": bad.reason,
                          "round": None, "attempts": 0, "model": cfg.model})
    writer.flush()

    state = _Run(cfg, writer)
    startup_s = elapsed = 0.0
    nodes: list[str] = []
    if pending:
        init_ray(cfg.ray)
        t0 = time.perf_counter()
        with open_engine(cfg) as engine:
            startup_s = time.perf_counter() - t0
            nodes = engine.replica_nodes()
            log.info("distilling %d conversations through %s", len(pending), engine.description)
            t1 = time.perf_counter()
            wave_size = d.shard_size * _WAVE_SHARDS
            try:
                for start in range(0, len(pending), wave_size):
                    works = [_Work(c, plan_rounds(c.messages, d.mode)) for c in pending[start:start + wave_size]]
                    state.wave(engine, works)
            finally:
                # Whatever finished is complete and counted; flushing it is never wrong.
                writer.flush()
            elapsed = time.perf_counter() - t1

    summary = DistillSummary(
        rows_in=read.records,
        rows_out=state.counts["written"],
        failed=state.counts["failed"],
        truncated=state.counts["truncated"],
        empty=state.counts["empty"],
        invalid=len(new_invalid),
        skipped=skipped,
        duplicates=read.duplicates,
        generated_tokens=state.generated_tokens,
        tokens_per_s=state.generated_tokens / elapsed if elapsed > 0 else 0.0,
        elapsed_s=elapsed,
        startup_s=startup_s,
        shards=writer.shards_written,
        output_dir=str(out),
        nodes=nodes,
    )
    print(summary.table(), flush=True)
    return summary


__all__ = ["DistillSummary", "run", "plan_rounds"]
