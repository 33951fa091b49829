"""Distill throughput: the Ray Data -> Serve vLLM pipeline vs bare ``vllm.LLM.generate`` on the same prompts.

    .venv/bin/python benchmarks/distill.py [--model DIR] [--num-prompts 512] [--max-tokens 128]

Both sides decode the same raw prompts greedily (the pipeline in ``distill.mode=completion``) with the same
engine settings; the bare run happens in a child process so the two engines never compete for the CPU.
Generation time excludes engine start-up on both sides; the pipeline's start-up is reported separately.
Without ``--model`` the embedded tiny model is built in a temp dir (about a minute on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CPU_ENGINE_KWARGS = {"gpu_memory_utilization": 0.1, "enforce_eager": True, "max_model_len": 512}


def _prompts(model: str, n: int) -> list[str]:
    """Raw prompts with the model's chat markers already in the text (completion mode sends text as is)."""
    from transformers import AutoTokenizer

    from medusa_ray.tiny import corpus

    tok = AutoTokenizer.from_pretrained(model)
    convs = corpus.conversations(n, seed=1234, max_user_turns=1)
    questions = [next(m["content"] for m in c if m["role"] == "user") for c in convs]
    if not tok.chat_template:
        return questions
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def _bare(model: str, prompts: list[str], max_tokens: int, engine_kwargs: dict) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, seed=0, **engine_kwargs)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up, like the pipeline's first batch
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t1
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"tokens": tokens, "elapsed_s": elapsed, "startup_s": startup}


def _pipeline(model: str, prompts: list[str], args, engine_kwargs: dict) -> dict:
    from medusa_ray import distill
    from medusa_ray.config import build_config

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cfg = build_config({
        "model": model,
        "ray": {"num_cpus": 8},
        "distill": {"input": str(work / "prompts.jsonl"), "output_dir": str(work / "out"), "mode": "completion",
                    "max_tokens": args.max_tokens, "engine_kwargs": engine_kwargs, "batch_size": args.batch_size,
                    "concurrency": args.concurrency, "shard_size": max(len(prompts), 1)},
    })
    s = distill.run(cfg)
    return {"tokens": s.generated_tokens, "elapsed_s": s.elapsed_s, "startup_s": s.startup_s,
            "rows": s.rows_out, "dropped": s.failed + s.truncated + s.empty}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir (default: build the tiny model)")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64, help="= distill.batch_size")
    p.add_argument("--concurrency", type=int, default=1, help="= distill.concurrency")
    p.add_argument("--engine-kwargs", default=None, help="JSON vLLM kwargs (default: small CPU settings on CPU)")
    p.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    engine_kwargs = json.loads(args.engine_kwargs) if args.engine_kwargs else {}
    if args.engine_kwargs is None:
        import torch

        engine_kwargs = {} if torch.cuda.is_available() else CPU_ENGINE_KWARGS
    model = args.model
    if model is None:
        from medusa_ray.tiny import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-")) / "tiny", pretrain_steps=150))
    prompts = _prompts(model, args.num_prompts)

    if args.bare_only:
        # vLLM keeps logging to stdout while it shuts down: tag our line so the parent can find it.
        print("BARE_RESULT " + json.dumps(_bare(model, prompts, args.max_tokens, engine_kwargs)), flush=True)
        return

    child = subprocess.run(
        [sys.executable, __file__, "--bare-only", "--model", model, "--num-prompts", str(args.num_prompts),
         "--max-tokens", str(args.max_tokens), "--engine-kwargs", json.dumps(engine_kwargs)],
        capture_output=True, text=True, check=True,
    )
    tagged = [line for line in child.stdout.splitlines() if line.startswith("BARE_RESULT ")]
    if not tagged:
        raise SystemExit(f"bare vLLM run printed no result:\n{child.stdout[-2000:]}\n{child.stderr[-2000:]}")
    bare = json.loads(tagged[-1].removeprefix("BARE_RESULT "))
    pipe = _pipeline(model, prompts, args, engine_kwargs)

    def tps(r: dict) -> float:
        return r["tokens"] / r["elapsed_s"] if r["elapsed_s"] > 0 else 0.0

    ratio = tps(pipe) / tps(bare) if tps(bare) > 0 else 0.0
    print()
    print(f"distill throughput: {args.num_prompts} prompts, max_tokens={args.max_tokens}, greedy, model={model}")
    print(f"{'':<28}{'tokens':>10}{'gen time (s)':>14}{'tokens/s':>12}{'start-up (s)':>14}")
    print(f"{'bare vllm.LLM.generate':<28}{bare['tokens']:>10}{bare['elapsed_s']:>14.2f}{tps(bare):>12.1f}"
          f"{bare['startup_s']:>14.1f}")
    print(f"{'Ray Data -> Serve pipeline':<28}{pipe['tokens']:>10}{pipe['elapsed_s']:>14.2f}{tps(pipe):>12.1f}"
          f"{pipe['startup_s']:>14.1f}")
    print(f"{'ratio (pipeline / bare)':<28}{ratio:>48.2f}")
    print(f"pipeline overhead: {pipe['elapsed_s'] - bare['elapsed_s'] * pipe['tokens'] / max(bare['tokens'], 1):.1f} s "
          f"beyond bare decoding of the same tokens; rows written {pipe['rows']}, dropped {pipe['dropped']}")


if __name__ == "__main__":
    main()
