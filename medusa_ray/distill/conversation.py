"""Driving conversations through the engine: the async Ray Data UDF at the heart of distill.

``Distiller`` is a callable class Ray Data runs as an asyncio actor. Each call gets one block of prompt records
(at most ``distill.shard_size``) and runs every conversation in it as its own coroutine: round r+1 is sent the
moment round r's reply arrives, a failed request is retried after its own backoff, and all conversations of
all the blocks the actor holds share one budget of requests in flight (an ``asyncio.Semaphore``). The engine
therefore always has a full batch, and no round, retry or block waits for any other; a block returns (and is
written as a shard) when its last conversation is finished.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import time
from typing import Any

import pyarrow as pa

from medusa_ray.config import Config
from medusa_ray.distill.engine import TOKEN_IDS_FIELD
from medusa_ray.distill.output import OUTCOME_SCHEMA, ROW
from medusa_ray.redact import strip_credentials_in_text

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 60.0
_PROGRESS_EVERY_S = 1.0


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


def request_seed(seed: int, conversation_id: str, round_: int, attempt: int) -> int:
    # Per request and attempt, so a retry samples anew while a re-run reproduces the same outputs. The id is
    # the row's: each sample of a conversation (``<id>#s<k>``) has seeds of its own, and sample 0 the seeds
    # every row had before there were samples.
    key = f"{seed}:{conversation_id}:{round_}:{attempt}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def backoff_s(base: float, attempt: int) -> float:
    """The wait before retry number ``attempt`` (1, 2, ...): ``base``, doubling, at most a minute."""
    return min(base * 2 ** (attempt - 1), _MAX_BACKOFF_S)


class Distiller:
    def __init__(self, cfg: dict[str, Any], model_id: str, client: dict[str, Any], in_flight: int, ledger=None,
                 kill_pids: list[int] | None = None, kill_at: str | None = None, client_factory=None):
        from medusa_ray.distill.engine import make_client

        self.cfg = Config.model_validate(cfg)
        self.model_id = model_id
        self.client = (client_factory or make_client)(client)
        self.in_flight = in_flight
        self.ledger = ledger
        self.kill_pids, self.kill_at = kill_pids, kill_at  # fault injection (medusa_ray.faults), tests only
        self._slots: asyncio.Semaphore | None = None
        self._done = self._tokens = 0
        self._first_request: float | None = None
        self._last_reply: float | None = None
        self._pushed = 0.0
        log.info("conversations driven with %d requests in flight per actor (%s)", in_flight,
                 client.get("kind", "custom"))

    async def __call__(self, batch: pa.Table) -> pa.Table:
        if self._slots is None:  # on the actor's event loop, which every call shares
            self._slots = asyncio.Semaphore(self.in_flight)
        async with self.client:
            rows = await asyncio.gather(*(self.conversation(r) for r in batch.to_pylist()))
        self._report(force=True)
        return pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)

    async def conversation(self, record: dict[str, Any]) -> dict[str, Any]:
        """One record -> its outcome row: every round answered, or where and why it stopped."""
        d = self.cfg.distill
        outcome = {"id": record["id"], "prompt_id": record.get("prompt_id") or record["id"],
                   "source": record["source"], "outcome": ROW, "error": None, "round": None,
                   "attempts": 0, "generated_tokens": 0, "messages": None, "mode": d.mode, "model": self.cfg.model,
                   "sampling": {"temperature": d.temperature, "top_p": d.top_p, "max_tokens": d.max_tokens,
                                "seed": d.seed},
                   "prompt_tokens": 0, "completion_tokens": 0, "finish_reason": None}
        if record["invalid"] is not None:
            return self._finish(outcome, "invalid", record["invalid"], None, 0)
        rounds = plan_rounds(json.loads(record["messages"]), d.mode)
        history: list[dict[str, str]] = []  # what the next round sends: role and content only
        reply_ids: list[list[int] | None] = []  # each assistant turn's generated ids, as the engine gave them
        for r, turns in enumerate(rounds):
            reply, attempts = await self._answer(record["id"], r, history + turns)
            outcome["generated_tokens"] += reply["generated"]
            if reply["error"]:
                return self._finish(outcome, "failed", reply["error"], r, attempts)
            if not reply["text"].strip():
                return self._finish(outcome, "empty", f"the model answered round {r} with nothing", r, attempts)
            history += turns + [{"role": "assistant", "content": reply["text"]}]
            reply_ids.append(reply.get("token_ids"))
            outcome["prompt_tokens"] += reply["prompt_tokens"]
            outcome["completion_tokens"] += reply["completion_tokens"]
            outcome["finish_reason"] = reply["finish_reason"]
            if self.kill_pids and self.kill_at == ("first_reply" if r == 0 else "later_round" if r == 2 else None):
                self._kill()
            if reply["finish_reason"] == "length":
                # A reply cut at max_tokens is still exactly what the model says, and the longest replies are most
                # of the tokens: keep it. The conversation ends here; a later round would follow a cut-off reply.
                break
        replies = iter(reply_ids)
        outcome["messages"] = [{**m, "token_ids": next(replies) if m["role"] == "assistant" else None}
                               for m in history]
        return self._finish(outcome, ROW, None, None, 0)

    async def _answer(self, conversation_id: str, round_: int, messages: list[dict[str, str]]):
        """The reply to one round, retried after a backoff while it fails: (reply, attempts made)."""
        d = self.cfg.distill
        generated = 0
        for attempt in range(d.max_retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(d.retry_backoff_s, attempt))
            body = self._body(conversation_id, round_, attempt, messages)
            async with self._slots:
                now = time.time()
                self._first_request = self._first_request or now
                reply = await self.client.complete(body)
            self._last_reply = time.time()
            generated += reply["completion_tokens"]
            self._tokens += reply["completion_tokens"]
            self._report()
            if not reply["error"]:
                break
        return {**reply, "generated": generated}, attempt + 1

    def _body(self, conversation_id: str, round_: int, attempt: int, messages: list[dict[str, str]]):
        d = self.cfg.distill
        body: dict[str, Any] = {
            "model": self.model_id,
            "temperature": d.temperature,
            "top_p": d.top_p,
            "max_tokens": d.max_tokens,
            "seed": d.seed if d.temperature == 0 else request_seed(d.seed, conversation_id, round_, attempt),
            "stream": False,
            # The reply's generated ids: what training learns verbatim (rows keep them per assistant turn).
            TOKEN_IDS_FIELD: True,
        }
        if d.mode == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = messages[0]["content"]
        return body

    def _finish(self, outcome: dict[str, Any], kind: str, error: str | None, round_: int | None,
                attempts: int) -> dict[str, Any]:
        # Error rows are read by whoever reads the output: no URL in them keeps its credentials, whatever the
        # client (or the server it quotes) put there.
        outcome.update(outcome=kind, error=strip_credentials_in_text(error), round=round_, attempts=attempts)
        self._done += 1
        self._report()
        return outcome

    def _report(self, force: bool = False) -> None:
        """Progress to the ledger about once a second (fire and forget): the driver's bar reads it there."""
        now = time.monotonic()
        if self.ledger is None or not (force or now - self._pushed >= _PROGRESS_EVERY_S):
            return
        if self._done or self._tokens:
            self.ledger.progress.remote(self._done, self._tokens, self._first_request, self._last_reply)
        self._done = self._tokens = 0
        self._pushed = now

    def _kill(self) -> None:
        """Fault ``distill_kill_at``: the run dies here as a killed job would (driver, then this worker)."""
        for pid in [*self.kill_pids, os.getpid()]:
            os.kill(pid, signal.SIGKILL)
