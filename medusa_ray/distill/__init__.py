"""distill: regenerate every assistant turn with the base model (Ray Data -> Ray Serve vLLM -> Parquet).

``run(cfg)`` is one streaming Ray Data execution from the input to the output shards::

    PromptSource (read, one task per file) -> claim (Ledger: drop done ids and repeats; one row per sample)
      -> Distiller (async actor: every conversation's rounds through the Serve deployment's handle)
      -> ShardSink (each finished block -> one data shard + one errors shard, renamed into place)

Why this shape: a conversation's rounds are sequential, and everything else is independent. Ray Data's
``ray.data.llm`` processors send one request per row, so multi-turn needs one execution per round with a
barrier between rounds (the engine idles while the slowest request of each round finishes, and each execution
pays seconds of actor start-up). Here one async actor drives whole conversations as coroutines over the
deployment handle (as the Serve processor itself calls it), all of them sharing a budget of requests in flight
sized to keep vLLM's continuous batch full; a conversation's next round goes out the moment its reply arrives.
Ray Data streams the input through and back-pressures the reader, so driver memory does not grow with the
dataset: the driver only holds the pipeline, the ledger actor holds the ids, and rows never leave the workers.

Exactly once across kills: a shard is named after the ids it holds and renamed into place whole, and a re-run
skips every id in a data shard or a final error, so a killed run loses only the conversations in flight.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from medusa_ray import faults
from medusa_ray.cluster import init_ray
from medusa_ray.config import Config
from medusa_ray.data import input_units
from medusa_ray.distill.conversation import plan_rounds
from medusa_ray.distill.output import existing_models, remove_stale_temp_files
from medusa_ray.errors import UserError, user_error_in
from medusa_ray.locks import hold
from medusa_ray.logs import verbose
from medusa_ray.progress import watch
from medusa_ray.writable import check_writable

log = logging.getLogger(__name__)


@dataclass
class DistillSummary:
    rows_in: int
    """Records read from the input (after ``distill.limit``), valid or not, repeats included."""
    rows_out: int
    """Rows written by this run: conversations, times ``samples`` (each sample is a row of its own)."""
    failed: int
    truncated: int
    """Of ``rows_out``: conversations ending in a reply cut at ``max_tokens`` (kept, ``finish_reason: length``)."""
    empty: int
    invalid: int
    skipped: int
    """Rows (samples) already in the output dir (data or final errors) from an earlier run."""
    duplicates: int
    generated_tokens: int
    """Every token the engine generated in this run, retries included."""
    tokens_per_s: float
    elapsed_s: float
    """Generation wall time: first request to last reply (engine start-up excluded)."""
    startup_s: float
    """From the start of the run to the first request: the engine, then Ray Data's actors."""
    shards: int
    output_dir: str
    nodes: list[str] = field(default_factory=list)
    """Ray node ids of the vLLM replicas that generated (empty for an endpoint)."""
    samples: int = 1
    """``distill.samples_per_prompt``: written, skipped, failed and empty count rows, up to this many per
    conversation."""
    without_token_ids: int = 0
    """Of ``rows_out``: rows with an assistant reply whose generated ids the engine did not return (training
    re-tokenizes its text)."""

    def summary(self) -> str:
        rows = [
            ("conversations in", self.rows_in),
            *([("samples per conversation", self.samples)] if self.samples > 1 else []),
            ("already done (skipped)", self.skipped),
            ("duplicates", self.duplicates),
            ("invalid", self.invalid),
            ("written", self.rows_out),
            ("  of which truncated", self.truncated),
            *([("  without token ids", self.without_token_ids)] if self.without_token_ids else []),
            ("failed", self.failed),
            ("empty", self.empty),
            ("generated tokens", self.generated_tokens),
            ("tokens/s", f"{self.tokens_per_s:.1f}"),
            ("generation time (s)", f"{self.elapsed_s:.1f}"),
            ("start-up (s)", f"{self.startup_s:.1f}"),
            ("shards written", self.shards),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"distill -> {self.output_dir}"] + [f"  {k:<{width}}  {v:>10}" for k, v in rows]
        return "\n".join(lines)


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
    import ray

    from medusa_ray.distill.source import Ledger

    d = cfg.distill
    started_at = time.time()
    fmt, units = input_units(d.input, d.format)
    out = Path(d.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    other_models = existing_models(out) - {cfg.model}
    if other_models:
        raise UserError(f"{out} already holds rows distilled from {sorted(other_models)}, not {cfg.model}; "
                        "use another distill.output_dir")

    init_ray(cfg.ray)
    # The ledger reads the output dir where the workers see it (a shared volume), not on the driver.
    ledger = ray.remote(Ledger).options(num_cpus=0, max_restarts=0).remote(str(out), d.samples_per_prompt)
    try:
        pending = _get(ledger.any_pending.remote(units, d.limit))
        log.info("distilling %s (%s) into %s", d.input, fmt, out)
        if pending:
            totals, nodes = _generate(cfg, units, out, ledger)
        else:  # nothing to generate: no engine starts; the ledger only counts what is there
            totals, nodes = {}, []
            _get(ledger.tally.remote(units, d.limit))
        counts = _get(ledger.snapshot.remote())
    finally:
        ray.kill(ledger)
    summary = DistillSummary(
        rows_in=counts["records"],
        rows_out=totals.get("rows", 0),
        failed=totals.get("failed", 0),
        truncated=totals.get("truncated", 0),
        empty=totals.get("empty", 0),
        invalid=totals.get("invalid", 0),
        skipped=counts["skipped"],
        duplicates=counts["duplicates"],
        generated_tokens=totals.get("tokens", 0),
        tokens_per_s=totals.get("tokens", 0) / counts["generation_s"] if counts["generation_s"] > 0 else 0.0,
        elapsed_s=counts["generation_s"],
        startup_s=counts["first_request"] - started_at if counts["first_request"] else 0.0,
        shards=totals.get("shards", 0),
        output_dir=str(out),
        nodes=nodes,
        samples=d.samples_per_prompt,
        without_token_ids=totals.get("without_token_ids", 0),
    )
    return summary


def _generate(cfg: Config, units, out: Path, ledger) -> tuple[dict, list[str]]:
    """The one Ray Data execution: input -> claim -> Distiller -> shards. Returns (the sink's totals, nodes)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from medusa_ray import logs
    from medusa_ray.distill.conversation import Distiller
    from medusa_ray.distill.engine import open_engine
    from medusa_ray.distill.output import ShardSink
    from medusa_ray.distill.source import PromptSource, claim

    logs.adopt_library_loggers()  # Ray Data set its loggers up on import
    d = cfg.distill
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose()  # ours below shows what a person wants: conversations and tokens/s
    # Requests carry their own timeout and retries; a long multi-turn shard is progress Ray Data cannot see.
    ctx.execution_no_progress_timeout_s = -1
    kill_at = faults.get("distill_kill_at")  # tests only
    kill_pids = [os.getpid()] if kill_at else None
    with open_engine(cfg) as engine:
        nodes = engine.replica_nodes()
        log.info("distilling through %s, %d requests in flight", engine.description, engine.in_flight)
        per_actor = -(-engine.in_flight // d.concurrency)
        # Enough blocks per actor that, while one block waits for its last conversation, others fill the slots.
        blocks_per_actor = -(-per_actor // d.shard_size) + 2
        source = PromptSource(units, d.limit, d.shard_size)
        # One block stream per read task (Ray would split them further to reach its default parallelism).
        ds = ray.data.read_datasource(source, override_num_blocks=source.num_tasks)
        ds = ds.map_batches(claim, fn_kwargs={"ledger": ledger}, batch_size=None, batch_format="pyarrow")
        # Streaming (no barrier): blocks of at most shard_size conversations, each becoming one shard.
        ds = ds.repartition(target_num_rows_per_block=d.shard_size, strict=True)
        ds = ds.map_batches(
            Distiller,
            fn_constructor_kwargs={"cfg": cfg.to_dict(), "model_id": engine.model_id,
                                   "client": engine.client_spec(), "in_flight": per_actor, "ledger": ledger,
                                   "kill_pids": kill_pids, "kill_at": kill_at},
            compute=ActorPoolStrategy(size=d.concurrency, max_tasks_in_flight_per_actor=blocks_per_actor,
                                      max_concurrent_calls_per_actor=blocks_per_actor),
            batch_size=None, batch_format="pyarrow", num_cpus=0.5,
        )
        sink = ShardSink(str(out), cfg.model, kill_pids if kill_at == "shard_write" else None)
        try:
            with watch("distill", "conversations", lambda: ray.get(ledger.snapshot.remote(), timeout=10),
                       functools.partial(_render, d.limit)):
                ds.write_datasink(sink)
        except Exception as exc:
            cause = user_error_in(exc)
            if cause is not None:
                raise cause from None
            raise
    superseded = _get(ledger.finish.remote(sink.totals["error_shards"]))
    if superseded:
        log.info("%d earlier failures now have an outcome; their old error rows were removed", superseded)
    return sink.totals, nodes


def _render(total: int | None, snap: dict) -> tuple[int, int | None, str]:
    seconds = snap["generation_s"]
    per_s = snap["conversations"] / seconds if seconds > 0 else 0.0
    tokens = snap["tokens"] / seconds if seconds > 0 else 0.0
    return snap["conversations"], total, f"{per_s:.1f} conversations/s, {tokens:,.0f} tokens/s"


def _get(ref):
    import ray

    try:
        return ray.get(ref)
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is not None:
            raise cause from None
        raise


__all__ = ["DistillSummary", "run", "plan_rounds"]
