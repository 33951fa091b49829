"""Distill throughput: the pipeline (Ray Data -> Ray Serve vLLM -> Parquet) vs bare vLLM on the same conversations.

    .venv/bin/python benchmarks/distill.py                          # single- and multi-turn, ~15 min on 2 cores
    .venv/bin/python benchmarks/distill.py --workloads multi --conversations 300
    .venv/bin/python benchmarks/distill.py --driver-memory 200000   # the driver's peak RSS over 200k conversations

What a user pays for is GPU time spent decoding, so both sides get the same unique conversations, the same
engine settings (fp32, so greedy outputs must match token for token; the table says whether they did) and
the same rounds: bare vLLM answers round r of every conversation with one ``LLM.chat`` call, then builds round
r+1 (the fastest plain vLLM can do it: no serving stack, all requests known up front); the pipeline is
``distill.run``. Generation time is first request to last reply on both sides; start-up (engine, actors) is
reported separately. Each side runs in its own process, one after the other, so they never share the CPU;
the pipeline's process is its driver, whose peak RSS is reported.

The model is a tiny Llama built here (cached under ``outputs/bench/``) that counts: "Ticket 52817: count down from 97 to 1."
is answered with the numbers, 120 to 260 tokens. So bare vLLM on this machine answers tens of requests a
second with replies of a few hundred tokens, as a GPU serving an 8B model does, and the ratio measures the
pipeline, not a toy that answers 500 requests a second in 20 tokens each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_DIR = Path(__file__).resolve().parents[1] / "outputs" / "bench" / "counting-model"
MODEL_VERSION = 2
# Both engines exactly alike. The batch sizes are vLLM's offline (LLM class) CPU defaults, spelled out because
# Serve LLM builds its engine as an OpenAI server, whose defaults are half that.
ENGINE_KWARGS = {"gpu_memory_utilization": 0.1, "enforce_eager": True, "max_model_len": 1024, "dtype": "float32",
                 "max_num_seqs": 256, "max_num_batched_tokens": 4096}
MAX_TOKENS = 384


def _count_task(rng: random.Random) -> tuple[str, str]:
    # Counting down ends the same way every time ("..., 2, 1."), which a tiny model learns to stop at.
    # The ticket number makes every prompt unique; the answer does not depend on it.
    a, ticket = rng.randrange(60, 131), rng.randrange(10_000, 100_000)
    return f"Ticket {ticket}: count down from {a} to 1.", ", ".join(str(i) for i in range(a, 0, -1)) + "."


def conversations(n: int, turns: int, seed: int) -> list[list[dict[str, str]]]:
    """``n`` distinct conversations of ``turns`` user turns (with the source's answers, which distill drops)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        messages = []
        for _ in range(turns):
            question, answer = _count_task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            out.append(messages)
    return out


def counting_model() -> str:
    """The benchmark's model, built once (about 10 minutes on 2 cores) and reused."""
    from medusa_ray.tiny import make_tiny_model

    marker = MODEL_DIR / "medusa_ray_tiny.json"
    if marker.exists() and json.loads(marker.read_text()).get("bench_version") == MODEL_VERSION:
        return str(MODEL_DIR)
    print(f"building the counting model in {MODEL_DIR} (once)", flush=True)
    convs = conversations(3000, 1, seed=7) + conversations(2000, 2, seed=8) + conversations(2000, 3, seed=9)
    make_tiny_model(MODEL_DIR, pretrain_steps=600, conversations=convs, max_length=800)
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "bench_version": MODEL_VERSION}, indent=2))
    return str(MODEL_DIR)


def _write_prompts(path: Path, convs) -> None:
    with open(path, "w") as f:
        for messages in convs:
            f.write(json.dumps({"messages": messages}) + "\n")


# ---------------------------------------------------------------- the two sides, each in its own process


def bare(model: str, prompts: str, out: str) -> dict:
    """Round by round with ``LLM.chat``; writes ``{id: messages}`` to ``out``."""
    from vllm import LLM, SamplingParams

    from medusa_ray.data import read_conversations
    from medusa_ray.distill import plan_rounds

    convs = read_conversations(prompts).conversations
    t0 = time.perf_counter()
    llm = LLM(model=model, seed=0, **ENGINE_KWARGS)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    llm.chat([[{"role": "user", "content": "Ticket 10000: count down from 9 to 1."}]] * 4, params, use_tqdm=False)  # warm-up
    active = [(c.id, plan_rounds(c.messages, "chat"), []) for c in convs]
    results, tokens, requests = {}, 0, 0
    t1 = time.perf_counter()
    for r in range(max(len(rounds) for _, rounds, _ in active)):
        active = [a for a in active if r < len(a[1])]
        if not active:
            break
        outputs = llm.chat([history + rounds[r] for _, rounds, history in active], params, use_tqdm=False)
        requests += len(active)
        still = []
        for (cid, rounds, history), output in zip(active, outputs):
            o = output.outputs[0]
            tokens += len(o.token_ids)
            if not o.text.strip():
                continue  # distill drops a conversation the model answers with nothing
            history += rounds[r] + [{"role": "assistant", "content": o.text}]
            if o.finish_reason == "length" or r + 1 == len(rounds):
                results[cid] = history  # a cut-off reply ends its conversation, as in distill
            else:
                still.append((cid, rounds, history))
        active = still
    elapsed = time.perf_counter() - t1
    Path(out).write_text(json.dumps(results))
    return {"tokens": tokens, "requests": requests, "elapsed_s": elapsed, "startup_s": startup}


def pipeline(model: str, prompts: str, out_dir: str, max_tokens: int = MAX_TOKENS) -> dict:
    from medusa_ray import distill
    from medusa_ray.config import build_config

    cfg = build_config({
        "model": model,
        "ray": {"num_cpus": 8},
        "distill": {"input": prompts, "output_dir": out_dir, "max_tokens": max_tokens,
                    "engine_kwargs": ENGINE_KWARGS},
    })
    t0 = time.perf_counter()
    s = distill.run(cfg)
    return {"tokens": s.generated_tokens, "elapsed_s": s.elapsed_s, "startup_s": s.startup_s,
            "wall_s": time.perf_counter() - t0, "rows": s.rows_out, "records": s.rows_in,
            "failed": s.failed, "empty": s.empty, "truncated": s.truncated,
            # ru_maxrss is KiB on Linux: the peak of this process (the driver) alone, not Ray's workers.
            "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(side: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, *args], capture_output=True, text=True)
    tagged = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not tagged:
        raise SystemExit(f"{side} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(tagged[-1].removeprefix("RESULT "))


def _pipeline_outputs(out_dir: Path) -> dict:
    import pyarrow.parquet as pq

    return {r["id"]: r["messages"] for f in sorted(out_dir.glob("*.parquet"))
            for r in pq.read_table(f, columns=["id", "messages"]).to_pylist()}


def throughput(model: str, workload: str, n: int, work: Path) -> dict:
    turns = 1 if workload == "single" else 3
    prompts = work / f"{workload}.jsonl"
    _write_prompts(prompts, conversations(n, turns, seed=100 + turns))
    b = _child("bare", model, str(prompts), str(work / f"{workload}-bare.json"))
    p = _child("pipeline", model, str(prompts), str(work / f"{workload}-out"))
    expected = json.loads((work / f"{workload}-bare.json").read_text())
    got = _pipeline_outputs(work / f"{workload}-out")
    same = sum(got.get(cid) == messages for cid, messages in expected.items())
    return {"workload": workload, "conversations": n, "turns": turns, "bare": b, "pipeline": p,
            "identical": f"{same}/{len(expected)}" + ("" if len(got) == len(expected) else f" ({len(got)} rows)")}


def _tps(side: dict) -> float:
    return side["tokens"] / side["elapsed_s"] if side["elapsed_s"] else 0.0


def print_table(results: list[dict]) -> None:
    head = (f"{'workload':<13}{'convs':>7}{'requests':>9}{'bare tok/s':>12}{'bare req/s':>11}"
            f"{'tokens/reply':>13}{'pipeline tok/s':>15}{'ratio':>7}{'start-up s':>11}{'driver MiB':>11}"
            f"{'identical':>11}")
    print("\n" + head)
    for r in results:
        b, p = r["bare"], r["pipeline"]
        name = f"{r['workload']} ({r['turns']}t)"
        print(f"{name:<13}"
              f"{r['conversations']:>7}{b['requests']:>9}{_tps(b):>12.0f}{b['requests'] / b['elapsed_s']:>11.1f}"
              f"{b['tokens'] / b['requests']:>13.0f}{_tps(p):>15.0f}{_tps(p) / _tps(b):>7.2f}"
              f"{p['startup_s']:>11.1f}{p['driver_peak_rss_mib']:>11.0f}{r['identical']:>11}")
    print("bare: vllm.LLM.chat per round (start-up excluded, bare start-up "
          + ", ".join(f"{r['bare']['startup_s']:.0f} s" for r in results) + "); pipeline: distill.run, "
          "generation from first request to last reply; start-up = run start to first request.")


def driver_memory(model: str, n: int, work: Path) -> None:
    """The driver's peak RSS distilling ``n`` conversations vs 2,000 (4-token replies: the engine's work is not
    what this measures, and the run stays near half an hour)."""
    rows = []
    for count in (2000, n):
        prompts = work / f"memory-{count}.jsonl"
        _write_prompts(prompts, conversations(count, 1, seed=count))
        size = prompts.stat().st_size / 2**20
        p = _child("pipeline", model, str(prompts), str(work / f"memory-{count}-out"), "4")
        rows.append((count, size, p))
    print(f"\n{'conversations':>14}{'input MiB':>11}{'rows written':>14}{'wall s':>9}{'driver peak RSS MiB':>21}")
    for count, size, p in rows:
        print(f"{count:>14}{size:>11.0f}{p['rows']:>14}{p['wall_s']:>9.0f}{p['driver_peak_rss_mib']:>21.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: the counting model, built once)")
    ap.add_argument("--workloads", default="single,multi", help="single, multi or both (comma-separated)")
    ap.add_argument("--conversations", type=int, help="per workload (default: 3600 single-turn, 900 multi-turn)")
    ap.add_argument("--driver-memory", type=int, metavar="N", help="measure the driver's peak RSS over N "
                    "conversations instead of throughput")
    ap.add_argument("--work-dir", help="where prompts and outputs go (default: a temp dir)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        side, *rest = args.child
        result = bare(*rest) if side == "bare" else pipeline(*rest[:3], *(int(x) for x in rest[3:]))
        print("RESULT " + json.dumps(result), flush=True)
        return

    model = args.model or counting_model()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="distill-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.driver_memory:
        driver_memory(model, args.driver_memory, work)
        return
    defaults = {"single": 3600, "multi": 900}
    results = []
    for workload in args.workloads.split(","):
        results.append(throughput(model, workload, args.conversations or defaults[workload], work))
        print(json.dumps(results[-1]), flush=True)
    print_table(results)


if __name__ == "__main__":
    main()
