"""bench: the served app under load, with and without the drafter, through the real ``openai`` client.

    medusa-ray bench [--draft DIR ...] [--prompts FILE] [--concurrency 1,4,16] [--requests N] [--plot PNG]

One Serve app serves the plain base (model ``base``) and each drafter (model ``<method>``), so every request goes
through the same ingress and client. At each ``eval.concurrency`` level, ``eval.bench_requests`` streamed greedy
chat requests (the same prompts, in the same order, with the same per-request seeds) go to each model, ``level``
at a time. Reported per level and model: time to first token and inter-token latency (each request's decode time
over its tokens after the first) at p50 and p99, output tokens/s over the level's wall time, speed-up against the
base at that level, and whether every greedy output equals the base's. The acceptance length is vLLM's own:
its spec-decode counters, which Serve LLM exports to Ray's Prometheus endpoint (read once at the end, over all
levels: with greedy decoding and identical prompts it does not depend on the load).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_ray.config import Config
from medusa_ray.errors import UserError

__all__ = ["run", "BenchResult", "summarize_level", "stops_paying", "speedup_at", "table", "plot"]

log = logging.getLogger(__name__)

BASE_ID = "base"


@dataclass
class Request:
    ok: bool
    text: str = ""
    tokens: int = 0
    ttft: float | None = None
    latency: float | None = None
    error: str = ""

    @property
    def itl(self) -> float | None:
        """Mean time between tokens after the first (vLLM's TPOT), robust to Serve batching stream chunks."""
        if self.ttft is None or self.latency is None or self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarize_level(requests: list[Request], wall_s: float) -> dict[str, Any]:
    ok = [r for r in requests if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [r.itl for r in ok if r.itl is not None]
    tokens = sum(r.tokens for r in ok)

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1000.0

    return {"requests": len(requests), "ok": len(ok), "failed": len(requests) - len(ok),
            "errors": sorted({r.error for r in requests if not r.ok})[:3],
            "ttft_p50_ms": ms(_percentile(ttft, 0.5)), "ttft_p99_ms": ms(_percentile(ttft, 0.99)),
            "itl_p50_ms": ms(_percentile(itl, 0.5)), "itl_p99_ms": ms(_percentile(itl, 0.99)),
            "output_tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0}


class BenchResult(dict):
    """The benchmark's results (the JSON written to ``eval.bench_output_json``), plus ``summary()``: the table."""

    def summary(self) -> str:
        return table(self)


# ---- the numbers ---------------------------------------------------------------------------------------------

def speedup_at(results: dict[str, Any], method: str, concurrency: int) -> float | None:
    for level in results.get("levels", []):
        if level["concurrency"] == concurrency:
            return (level["models"].get(method) or {}).get("speedup")
    return None


def stops_paying(results: dict[str, Any], method: str) -> int | None:
    """The lowest measured concurrency at which the drafter no longer beats plain decoding (speed-up <= 1);
    None when it pays at every level measured."""
    for level in sorted(results.get("levels", []), key=lambda lv: lv["concurrency"]):
        s = (level["models"].get(method) or {}).get("speedup")
        if s is not None and s <= 1.0:
            return level["concurrency"]
    return None


def table(results: dict[str, Any]) -> str:
    def num(v: Any, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)

    head = (f"{'clients':>7}  {'model':<8}  {'ok':>5}  {'TTFT p50':>8}  {'p99':>7}  {'ITL p50':>7}  {'p99':>6}  "
            f"{'tokens/s':>8}  {'speed-up':>8}  identical")
    lines = [head]
    for level in results["levels"]:
        for name, m in level["models"].items():
            identical = "-" if name == BASE_ID else ("yes" if m.get("identical") else "NO")
            lines.append(f"{level['concurrency']:>7}  {name:<8}  {m.get('ok', 0):>2}/{m.get('requests', 0):<2}  "
                         f"{num(m.get('ttft_p50_ms')):>8}  {num(m.get('ttft_p99_ms')):>7}  "
                         f"{num(m.get('itl_p50_ms')):>7}  {num(m.get('itl_p99_ms')):>6}  {num(m.get('tokens_per_s')):>8}  "
                         f"{num(m.get('speedup'), '{:.2f}x'):>8}  {identical}")
    lines.append("(TTFT and ITL in ms; ITL: decode time per token after the first, per request)")
    target = results.get("target_concurrency")
    for method, d in results.get("drafters", {}).items():
        accept = d.get("acceptance_length")
        where = d.get("stops_paying_at")
        verdict = (f"stops paying at {where} client{'s' if where != 1 else ''}" if where is not None
                   else "pays at every level measured")
        lines.append(f"{method}: acceptance length {num(accept, '{:.3f}')} "
                     f"({d.get('acceptance_source', 'vLLM spec-decode counters')}); {verdict}; "
                     f"speed-up at the target ({target} clients) {num(speedup_at(results, method, target), '{:.2f}x')}")
    best = results.get("best_at_target")
    lines.append(f"at {target} clients: " + (f"{best} is the fastest" if best else
                                             "no drafter beats plain decoding"))
    if results.get("plot"):
        lines.append(f"plot: {results['plot']}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    levels = sorted(results["levels"], key=lambda lv: lv["concurrency"])
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [lv["concurrency"] for lv in levels]
    for method in results.get("drafters", {}):
        ys = [lv["models"].get(method, {}).get("speedup") for lv in levels]
        ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o", label=method)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="plain decoding")
    target = results.get("target_concurrency")
    if target:
        ax.axvline(target, color="grey", linestyle=":", linewidth=1, label=f"target ({target})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("speed-up (output tokens/s vs. no drafter)")
    ax.set_title("Speed-up against load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- vLLM's counters through Ray's Prometheus endpoint --------------------------------------------------------

_SAMPLE = re.compile(r"^(ray_vllm_spec_decode_num_(?:drafts|accepted_tokens))(?:_total)?\{(.*)\}\s+([0-9.eE+-]+)$")


def parse_spec_counters(text: str, model_ids: list[str]) -> dict[str, dict[str, float]]:
    """``{model_id: {"drafts": n, "accepted": n}}`` from Prometheus text: a sample counts for the model whose id
    one of its label values names (vLLM's ``model_name``, Serve's replica id)."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        labels = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2))
        values = [v for _, v in labels]
        owner = next((mid for mid in model_ids
                      if any(v == mid or re.search(rf"(^|[^\w-]){re.escape(mid)}($|[^\w-])", v) for v in values)),
                     None)
        if owner is None:
            continue
        key = "drafts" if m.group(1).endswith("drafts") else "accepted"
        out.setdefault(owner, {"drafts": 0.0, "accepted": 0.0})[key] += float(m.group(3))
    return out


def _metrics_text() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                texts.append(resp.read().decode("utf-8", errors="replace"))
        except OSError as exc:
            log.debug("metrics of node %s not readable: %s", node.get("NodeID"), exc)
    return "\n".join(texts)


def spec_counters(model_ids: list[str], settle_s: float = 12.0, timeout_s: float = 45.0
                  ) -> dict[str, dict[str, float]] | None:
    """The counters once Ray's metrics agents have flushed them (unchanged for ``settle_s``, at most
    ``timeout_s``); None when no node exports them."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        now = parse_spec_counters(_metrics_text(), model_ids)
        if now != last:
            last, since = now, time.monotonic()
        elif now and time.monotonic() - since >= settle_s:
            return now
        if time.monotonic() > deadline:
            return last or None
        time.sleep(2.0)


# ---- the load --------------------------------------------------------------------------------------------------

async def _one(client, model: str, messages: list[dict], seed: int, max_tokens: int) -> Request:
    t0 = time.perf_counter()
    ttft, parts, tokens = None, [], 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, temperature=0.0, max_tokens=max_tokens, seed=seed, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta.content or ""
                if delta and ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(delta)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, never the end of the benchmark
        return Request(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return Request(ok=True, text="".join(parts), tokens=tokens, ttft=ttft, latency=time.perf_counter() - t0)


async def drive(url: str, model: str, prompts: list[list[dict]], concurrency: int, max_tokens: int,
                timeout_s: float, seed: int = 0) -> tuple[list[Request], float]:
    """``len(prompts)`` requests, ``concurrency`` at a time; request i has seed ``seed + i``. Requests still
    running after ``timeout_s`` are cancelled and count as failed."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="medusa-ray", max_retries=0, timeout=timeout_s)
    results: list[Request | None] = [None] * len(prompts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await _one(client, model, prompts[i], seed + i, max_tokens)

    t0 = time.perf_counter()
    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(prompts)))]
    done, pending = await asyncio.wait(workers, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    return [r or Request(ok=False, error=f"not done within eval.bench_timeout_s={timeout_s:g}") for r in results], wall


def _model_ids(methods: list[str]) -> list[str]:
    ids, seen = [], {}
    for method in methods:
        seen[method] = seen.get(method, 0) + 1
        ids.append(method if seen[method] == 1 else f"{method}-{seen[method]}")
    return ids


def run(cfg: Config, draft_dirs: list[str] | None = None) -> BenchResult:
    """Serve the base and each drafter in ``draft_dirs`` (default ``export.output_dir``), drive them at each
    ``eval.concurrency`` level, shut the app down; the results, their table (``summary()``), JSON and PNG."""
    from medusa_ray import drafters
    from medusa_ray.data import read_prompts
    from medusa_ray.serve import ServedModel, deploy, served_model
    from medusa_ray.writable import check_writable

    draft_dirs = list(draft_dirs or [cfg.export.output_dir])
    if not cfg.eval.prompts:
        raise UserError("eval.prompts is not set: pass --prompts FILE")
    if cfg.distill.mode != "chat":
        raise UserError("the load benchmark sends chat requests: it needs distill.mode=chat")
    methods = [drafters.detect(Path(d).expanduser().resolve())[0].method for d in draft_dirs]
    ids = _model_ids(methods)
    models = [served_model(cfg, d, model_id=mid) for d, mid in zip(draft_dirs, ids)]
    bases = {m.base for m in models}
    if len(bases) > 1:
        raise UserError(f"the drafters were made for different bases ({', '.join(sorted(bases))}); benchmark them "
                        "one base at a time")
    base = models[0].base
    levels = list(dict.fromkeys(cfg.eval.concurrency))
    target = cfg.eval.target_concurrency or max(levels)
    if target not in levels:
        levels = sorted(levels + [target])
    plot_path = Path(cfg.eval.bench_plot or Path(models[0].draft_dir).parent / "bench.png").expanduser()
    json_path = Path(cfg.eval.bench_output_json or plot_path.with_suffix(".json")).expanduser()
    for path, key in ((plot_path, "eval.bench_plot"), (json_path, "eval.bench_output_json")):
        check_writable(path.parent, key)
    prompts = read_prompts(cfg.eval.prompts, max(cfg.eval.bench_requests, max(levels)), "chat")
    if not prompts:
        raise UserError(f"{cfg.eval.prompts}: no prompts")

    # An app and a route of its own: a served app (at /) keeps running beside the benchmark.
    name = f"{cfg.serve.app_name}-bench"
    served = deploy(cfg, [ServedModel(model_id=BASE_ID, base=base), *models], app_name=name, route_prefix=f"/{name}")
    try:
        names = [BASE_ID, *ids]
        for name in names:  # warm-up: the first request of an engine pays for lazy set-up
            asyncio.run(drive(served.url, name, prompts[:1], 1, 4, cfg.eval.bench_timeout_s))
        measured = []
        for level in levels:
            n = max(cfg.eval.bench_requests, level)
            batch = [prompts[i % len(prompts)] for i in range(n)]
            row: dict[str, Any] = {"concurrency": level, "models": {}}
            texts: dict[str, list[str | None]] = {}
            for name in names:
                requests, wall = asyncio.run(drive(served.url, name, batch, level, cfg.eval.max_tokens,
                                                   cfg.eval.bench_timeout_s, seed=cfg.distill.seed))
                row["models"][name] = summarize_level(requests, wall)
                texts[name] = [r.text if r.ok else None for r in requests]
                log.info("bench: %d clients, %s: %.1f tokens/s", level, name, row["models"][name]["tokens_per_s"])
            base_tps = row["models"][BASE_ID]["tokens_per_s"]
            for name in ids:
                m = row["models"][name]
                m["speedup"] = m["tokens_per_s"] / base_tps if base_tps else None
                pairs = [(a, b) for a, b in zip(texts[BASE_ID], texts[name]) if a is not None and b is not None]
                m["identical"] = bool(pairs) and all(a == b for a, b in pairs)
                m["differing"] = sum(a != b for a, b in pairs)
            measured.append(row)
        counters = spec_counters(ids) if cfg.serve.engine_metrics else None
    finally:
        served.shutdown()

    results: dict[str, Any] = {"base_model": base, "levels": measured, "target_concurrency": target,
                               "max_tokens": cfg.eval.max_tokens, "url": served.url, "drafters": {}}
    for name, model in zip(ids, models):
        c = (counters or {}).get(name)
        entry = {"method": model.method, "draft_dir": model.draft_dir,
                 "num_speculative_tokens": model.speculative_config["num_speculative_tokens"],
                 "acceptance_length": 1.0 + c["accepted"] / c["drafts"] if c and c["drafts"] else None,
                 "acceptance_source": "vLLM spec-decode counters" if c else
                 "not readable: serve.engine_metrics is off or Ray exports no metrics here"}
        results["drafters"][name] = entry
    for name in ids:
        results["drafters"][name]["stops_paying_at"] = stops_paying(results, name)
        results["drafters"][name]["speedup_at_target"] = speedup_at(results, name, target)
        results["drafters"][name]["identical"] = all(lv["models"][name]["identical"] for lv in measured)
    paying = {n: speedup_at(results, n, target) for n in ids}
    paying = {n: s for n, s in paying.items() if s is not None and s > 1.0}
    results["best_at_target"] = max(paying, key=paying.get) if paying else None
    results["outputs_identical"] = all(d["identical"] for d in results["drafters"].values())
    results["plot"] = str(plot(results, plot_path))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    results["output_json"] = str(json_path)
    return BenchResult(results)
