"""``medusa-ray`` command line: parse arguments, build the config, call one stage, print the result.

Every stage subcommand takes ``--config FILE.yaml`` plus dotted overrides (``train.num_workers=2``);
stage-specific flags are shorthands for overrides, so the config object stays the single source of truth.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medusa_ray import logs
from medusa_ray.config import Config, load_config
from medusa_ray.errors import UserError
from medusa_ray.paths import is_remote
from medusa_ray.writable import check_writable

# flag dest -> dotted config key; a flag given on the command line becomes an override.
_FLAG_KEYS: dict[str, dict[str, str]] = {
    "distill": {"input": "distill.input", "output": "distill.output_dir"},
    "train": {"data": "train.data"},
    "export": {
        "output": "export.output_dir",
        "push_to_hub": "export.push_to_hub",
        "private": "export.private",
        "overwrite": "export.overwrite",
    },
    "eval": {
        "model": "model",
        "prompts": "eval.prompts",
        "num_prompts": "eval.num_prompts",
        "max_tokens": "eval.max_tokens",
        "heldout": "eval.heldout",
        "output_json": "eval.output_json",
        "plot": "eval.plot",
    },
    "pipeline": {},
    "serve": {"model": "model", "host": "serve.host", "port": "serve.port", "model_id": "serve.model_id"},
    "bench": {
        "model": "model",
        "prompts": "eval.prompts",
        "requests": "eval.bench_requests",
        "max_tokens": "eval.max_tokens",
        "target": "eval.target_concurrency",
        "output_json": "eval.bench_output_json",
        "plot": "eval.bench_plot",
    },
}


def _stage_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    # Here too, so `jobs/<stage>.py -v` works; SUPPRESS keeps `medusa-ray -v <stage>` from being reset.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="full logs on the console (they always go to the log file)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (sections: model, ray, distill, train, "
                   "export, eval, serve)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medusa-ray",
        description="Train speculative-decoding drafters (Medusa heads, EAGLE-3) for a Hugging Face causal LM on a "
                    "Ray cluster.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="full logs on the console (they always go to the log file)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny-model", help="write the embedded tiny Llama model (no download)",
                       description="Write a tiny Llama model directory that transformers and vLLM load.")
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="briefly train on generated conversations so outputs have structure (0: random)")
    p.add_argument("--seed", type=int, default=0)

    p = _stage_parser(sub, "distill", "regenerate assistant turns with the base model into Parquet")
    p.add_argument("--input", help="prompts file or directory (= distill.input)")
    p.add_argument("--output", help="output directory (= distill.output_dir)")

    p = _stage_parser(sub, "train", "train a drafter on distilled Parquet with Ray Train + DeepSpeed")
    p.add_argument("--data", help="distilled Parquet (= train.data)")

    p = _stage_parser(sub, "export", "write a drafter directory that vLLM (and, for Medusa, TGI) loads; "
                      "optionally push it")
    p.add_argument("--checkpoint", help="Ray Train checkpoint dir (default: latest of train.run_name)")
    p.add_argument("--output", help="= export.output_dir")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="= export.push_to_hub")
    p.add_argument("--private", action="store_true", default=None, help="create the Hub repo private")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing export")

    p = _stage_parser(sub, "eval", "measure acceptance length and speed-up with vLLM speculative decoding")
    p.add_argument("--model", help="base model (= model; default: the base the draft was exported for)")
    p.add_argument("--draft", metavar="DIR", help="exported drafter directory (default: export.output_dir)")
    p.add_argument("--medusa", dest="medusa", metavar="DIR", help=argparse.SUPPRESS)  # 0.1's name for --draft
    p.add_argument("--prompts", help="= eval.prompts")
    p.add_argument("--num-prompts", type=int, help="= eval.num_prompts")
    p.add_argument("--max-tokens", type=int, help="= eval.max_tokens")
    p.add_argument("--heldout", help="distilled Parquet for per-head accuracy (= eval.heldout)")
    p.add_argument("--output-json", help="= eval.output_json")
    p.add_argument("--plot", help="PNG of acceptance per position (= eval.plot)")

    _stage_parser(sub, "pipeline", "distill -> train -> export -> eval in one run")

    p = _stage_parser(sub, "serve", "serve the base with its drafter as an OpenAI-compatible Ray Serve LLM app")
    p.add_argument("--draft", metavar="DIR", help="exported drafter directory (default: export.output_dir)")
    p.add_argument("--no-draft", action="store_true", help="serve the plain base, without a drafter")
    p.add_argument("--model", help="base model (= model; default: the base the draft was exported for)")
    p.add_argument("--model-id", help="the name clients put in `model` (= serve.model_id)")
    p.add_argument("--host", help="= serve.host")
    p.add_argument("--port", type=int, help="= serve.port")
    p.add_argument("--detach", action="store_true",
                   help="return once the app is healthy and leave it running (default: serve until Ctrl-C)")

    p = _stage_parser(sub, "bench", "load benchmark of the served app through the openai client, with and "
                      "without the drafter(s), at eval.concurrency clients")
    p.add_argument("--draft", metavar="DIR", action="append",
                   help="exported drafter directory; repeat to compare several (default: export.output_dir)")
    p.add_argument("--model", help="base model (= model; default: the base the draft was exported for)")
    p.add_argument("--prompts", help="= eval.prompts")
    p.add_argument("--concurrency", metavar="1,4,16", help="concurrent clients per level (= eval.concurrency)")
    p.add_argument("--requests", type=int, help="requests per level (= eval.bench_requests)")
    p.add_argument("--max-tokens", type=int, help="= eval.max_tokens")
    p.add_argument("--target", type=int, help="the concurrency you serve (= eval.target_concurrency)")
    p.add_argument("--output-json", help="= eval.bench_output_json")
    p.add_argument("--plot", help="PNG of speed-up against concurrency (= eval.bench_plot)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config a parsed command line describes: file, then flags and overrides (the jobs/ share it)."""
    overrides = list(args.overrides)
    for dest, key in _FLAG_KEYS.get(args.command, {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            # repr keeps strings as YAML strings ('007' stays text) and numbers/bools as they are.
            overrides.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    if getattr(args, "concurrency", None):
        overrides.append(f"eval.concurrency=[{args.concurrency}]")
    return load_config(args.config, overrides)


def draft_dir(args: argparse.Namespace) -> str | None:
    """``eval --draft``; ``--medusa``, its name in medusa-ray 0.1, still works in 0.2, with a deprecation line."""
    if getattr(args, "medusa", None):
        print("medusa-ray eval: --medusa is deprecated and will be removed after 0.2; use --draft", file=sys.stderr)
        if getattr(args, "draft", None) is None:
            return args.medusa
    return getattr(args, "draft", None)


def log_location(cfg: Config, command: str, draft: str | None = None) -> tuple[str, str]:
    """Where a command's output goes, and its config key: the full log goes to ``logs/`` there (beside an
    export or an eval file, never inside the export, which is published)."""
    if command == "train":
        return cfg.train.storage_path, "train.storage_path"
    if command in ("distill", "pipeline"):
        return cfg.distill.output_dir, "distill.output_dir"
    if command == "export":
        return str(Path(cfg.export.output_dir).expanduser().parent), "export.output_dir"
    if command == "serve":
        return str(Path(cfg.distill.output_dir).expanduser().parent), "distill.output_dir"
    if command == "bench" and not (cfg.eval.bench_output_json or cfg.eval.bench_plot):
        return str(Path(cfg.export.output_dir).expanduser().parent), "export.output_dir"
    if command == "bench" and cfg.eval.bench_output_json:
        return str(Path(cfg.eval.bench_output_json).expanduser().parent), "eval.bench_output_json"
    if command == "bench" and cfg.eval.bench_plot:
        return str(Path(cfg.eval.bench_plot).expanduser().parent), "eval.bench_plot"
    if cfg.eval.output_json and command != "bench":
        return str(Path(cfg.eval.output_json).expanduser().parent), "eval.output_json"
    return str(Path(draft or cfg.export.output_dir).expanduser().parent), "--draft"


def log_dir(cfg: Config, command: str, draft: str | None = None) -> Path:
    """The command's log directory, after checking its location is writable (one line if not). A log file is
    never appended to object storage: runs whose output is there log to ``outputs/logs`` (train: the run's
    local mirror of its files)."""
    location, key = log_location(cfg, command, draft)
    if command == "train" and is_remote(location):
        from medusa_ray.train import local_run_dir

        return local_run_dir(cfg) / "logs"
    if is_remote(location):
        return Path("outputs") / "logs"
    check_writable(location, key)
    if command == "train":
        from medusa_ray.train import run_location

        return Path(run_location(cfg)) / "logs"
    return Path(location).expanduser().resolve() / "logs"


def run_stage(args: argparse.Namespace, cfg: Config):
    """Call the command's stage and return its result (every result's ``summary()`` is what gets printed)."""
    if args.command == "distill":
        from medusa_ray import distill

        return distill.run(cfg)
    if args.command == "train":
        from medusa_ray import train

        return train.run(cfg)
    if args.command == "export":
        from medusa_ray import export

        return export.run(cfg, checkpoint=args.checkpoint)
    if args.command == "eval":
        from medusa_ray import evaluate

        return evaluate.run(cfg, draft_dir=draft_dir(args))
    if args.command == "serve":
        from medusa_ray import serve

        return serve.run(cfg, draft_dir=None if args.no_draft else (args.draft or serve.DEFAULT_DRAFT))
    if args.command == "bench":
        from medusa_ray.serve import bench

        return bench.run(cfg, draft_dirs=args.draft)
    from medusa_ray import pipeline

    return pipeline.run(cfg)


def serve_until_interrupted(result) -> None:
    """``medusa-ray serve`` without ``--detach``: keep the app up until Ctrl-C (or the job is stopped), then
    delete it."""
    import signal
    import time

    def stop(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C, `ray job stop` and Kubernetes send SIGINT or SIGTERM; a shell that started us in the background may
    # have left SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("serving; Ctrl-C stops and deletes the app", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        result.shutdown()


def execute(args: argparse.Namespace, prog: str, before_stage=None) -> int:
    """Run a parsed command: logging, config, the full log file, the stage; a ``UserError`` is one line."""
    logs.set_verbose(args.verbose)
    logs.setup(args.verbose)
    try:
        if args.command == "make-tiny-model":
            from medusa_ray.tiny import make_tiny_model

            path = make_tiny_model(args.out_dir, pretrain_steps=args.pretrain_steps, seed=args.seed)
            print(f"tiny model written to {path}")
            return 0
        cfg = config_from_args(args)
        log_path = logs.start_file(log_dir(cfg, args.command, draft_dir(args)), args.command)
        try:
            if before_stage is not None:
                before_stage(cfg)
            result = run_stage(args, cfg)
            print(("\n" if args.command in ("train", "pipeline") else "") + result.summary(), flush=True)
        finally:
            print(f"full log: {log_path}", flush=True)
        if args.command == "serve" and not args.detach:
            serve_until_interrupted(result)
        return 0
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(args, f"medusa-ray {args.command}")


if __name__ == "__main__":
    sys.exit(main())
