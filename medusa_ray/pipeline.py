"""pipeline: distill -> train -> export -> eval on one Ray cluster.

Each stage skips work already complete in its output location, so re-running after a crash continues
where it stopped: distillation is not redone, training resumes from its last checkpoint. The pipeline only
sequences the stages: each gets its own config (``_stage_config``), and their results print as they finish.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medusa_ray import drafters
from medusa_ray.cluster import init_ray, node_id
from medusa_ray.config import Config
from medusa_ray.errors import UserError
from medusa_ray.locks import hold
from medusa_ray.paths import is_remote
from medusa_ray.redact import strip_credentials
from medusa_ray.writable import check_writable

log = logging.getLogger(__name__)


@dataclass
class PipelineSummary:
    rows_distilled: int
    train_steps: int
    train_resumed_from: int
    head_top1: list[float]
    """Per head: top-1 on the held-back validation rows (the last training batch's when there are none)."""
    expected_acceptance: float | None
    """Validation estimate of the acceptance length, from ``head_top1``."""
    acceptance_length: float | None
    acceptance_length_untrained: float | None
    speedup: float | None
    outputs_identical: bool | None
    export_dir: str
    method: str = "medusa"
    """The drafter the fields above describe: the only one trained, or the faster of ``train.method``'s."""
    compared: dict[str, dict[str, Any]] = field(default_factory=dict)
    """With several ``train.method``s: each drafter's numbers, measured on the same held-back prompts."""
    plots: list[str] = field(default_factory=list)
    """Training's curves and validation, eval's acceptance per position."""
    nodes: dict[str, list[str]] = field(default_factory=dict)
    """Ray node ids each stage's work ran on, and the driver's (``driver``)."""
    pushed: str | None = None
    """The Hub URL the chosen export went to, when ``export.push_if`` held (None: not pushed)."""
    push_decision: str | None = None
    """``export.push_if``'s verdict, one line."""
    speedup_where: str = "offline eval"
    """Where ``speedup`` was measured: eval's offline batch, or the load benchmark at N clients."""
    bench_table: str | None = None
    """The load benchmark's table, when ``eval.bench`` ran."""

    def summary(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "-"
            return f"{v:.3f}" if isinstance(v, float) else str(v)

        drafter = drafters.get(self.method)
        what = drafter.title.split()[-1]  # "heads", "draft"
        rows = [
            ("rows distilled", self.rows_distilled),
            ("train steps", f"{self.train_steps}"
                            + (f" (resumed at {self.train_resumed_from})" if self.train_resumed_from else "")),
            (f"{drafter.position} top-1 (validation)", " ".join(f"{a:.3f}" for a in self.head_top1) or "-"),
            ("expected acceptance (validation)", self.expected_acceptance),
            (f"acceptance length (trained {what})", self.acceptance_length),
            (f"acceptance length (untrained {what})", self.acceptance_length_untrained),
            (f"speed-up vs. no speculation ({self.speedup_where})", self.speedup),
            ("greedy outputs identical", self.outputs_identical),
            ("export", self.export_dir),
        ] + [("plot", plot) for plot in self.plots]
        if self.push_decision:
            rows.append(("push", self.push_decision))
        if self.compared:
            rows = rows[:1] + [("drafter (the faster)", self.method)] + rows[1:]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {fmt(v)}" for k, v in rows]
        if self.compared:
            lines += ["", comparison_table(self.compared, self.method)]
        if self.bench_table:
            lines += ["", self.bench_table]
        return "\n".join(lines)


def comparison_table(compared: dict[str, dict[str, Any]], fastest: str) -> str:
    """Drafters side by side, on the same distilled data and the same held-back prompts."""
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    head = f"{'drafter':<8}  {'val. estimate':>13}  {'acceptance':>10}  {'untrained':>9}  {'speed-up':>8}  identical"
    lines = [head]
    for method, c in compared.items():
        lines.append(f"{method:<8}  {cell(c['expected_acceptance']):>13}  {cell(c['acceptance_length']):>10}  "
                     f"{cell(c['acceptance_length_untrained']):>9}  {cell(c['speedup']):>8}  "
                     f"{cell(c['outputs_identical'])}")
    others = [m for m in compared if m != fastest]
    lines.append(f"faster: {fastest}" + (f" ({compared[fastest]['speedup']:.2f}x vs "
                                        + ", ".join(f"{m} {compared[m]['speedup']:.2f}x" for m in others) + ")"
                                        if others and all(compared[m]["speedup"] for m in compared) else ""))
    return "\n".join(lines)


def _work_dir(cfg: Config) -> Path:
    path = Path(cfg.distill.output_dir) / "_pipeline"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _split_heldout(cfg: Config, work: Path) -> Config:
    """Hold ``eval.num_prompts`` input conversations back from distillation for evaluation.

    The split is written once and reused, so a re-run distills exactly the same conversations.
    """
    from medusa_ray.cluster import run_task

    train_file, heldout_file = work / "distill_prompts.jsonl", work / "heldout_prompts.jsonl"
    d = cfg.distill
    _check_fingerprint(work / "split.json", {"distill.input": d.input, "distill.format": d.format,
                                             "distill.limit": d.limit, "eval.num_prompts": cfg.eval.num_prompts},
                       "the held-out split")
    if not (train_file.exists() and heldout_file.exists()):
        if not cfg.distill.input:
            raise UserError("distill.input is not set: the pipeline needs prompts to distill")
        # A pass over the whole input: a worker's job, not the driver's.
        split = run_task(write_split, d.input, d.format, d.limit, cfg.eval.num_prompts, str(train_file),
                         str(heldout_file), name="medusa-ray-split")
        if split["invalid"]:
            log.warning("%d invalid records in %s are not distilled, e.g. %s", split["invalid"], d.input,
                        "; ".join(split["invalid_examples"]))
    return _stage_config(cfg, distill={"input": str(train_file), "format": "jsonl", "limit": None},
                         eval={"prompts": str(heldout_file)})


def write_split(input_path: str, fmt: str, limit: int | None, num_prompts: int, train_file: str,
                heldout_file: str) -> dict[str, Any]:
    """Stream the input twice: pick the held-back conversations (the ``num_prompts`` with the smallest hash of
    their id, so they are spread over the input whatever its order, at most a fifth of it), then write them and
    everything else to their own files. Memory holds the ids, never the conversations."""
    import hashlib
    import heapq

    from medusa_ray.data import Conversation, input_units, iter_records

    _, units = input_units(input_path, fmt)

    def key(cid: str) -> int:
        return int(hashlib.sha256(f"heldout:{cid}".encode()).hexdigest()[:16], 16)

    distinct: set[str] = set()
    smallest: list[tuple[int, str]] = []  # a max-heap (negated keys) of the num_prompts smallest keys
    invalid, examples = 0, []
    for record in iter_records(units, limit):
        if not isinstance(record, Conversation):
            invalid += 1
            examples = (examples + [f"{record.source}: {record.reason}"])[:3]
            continue
        if record.id in distinct:
            continue
        distinct.add(record.id)
        item = (-key(record.id), record.id)
        if len(smallest) < num_prompts:
            heapq.heappush(smallest, item)
        elif item > smallest[0]:
            heapq.heapreplace(smallest, item)
    n_eval = min(num_prompts, len(distinct) // 5)
    if n_eval < 1:
        raise UserError(f"{input_path}: too few conversations ({len(distinct)}) to hold any back for evaluation; "
                        "set eval.prompts")
    heldout = {cid for _, cid in sorted(smallest, reverse=True)[:n_eval]}
    written: set[str] = set()
    with _atomic_jsonl(heldout_file) as held, _atomic_jsonl(train_file) as rest:
        for record in iter_records(units, limit):
            if isinstance(record, Conversation) and record.id not in written:
                written.add(record.id)
                line = json.dumps({"messages": record.messages}, ensure_ascii=False) + "\n"
                (held if record.id in heldout else rest).write(line)
    return {"heldout": n_eval, "conversations": len(distinct), "invalid": invalid, "invalid_examples": examples}


class _atomic_jsonl:
    """Write a text file under a temporary name and rename it into place on success."""

    def __init__(self, path: str):
        self.path, self.tmp = Path(path), Path(path).with_suffix(".tmp")

    def __enter__(self):
        self.file = open(self.tmp, "w")
        return self.file

    def __exit__(self, exc_type, *rest):
        self.file.close()
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _check_fingerprint(path: Path, settings: dict[str, Any], what: str) -> None:
    """The settings ``what`` was made with are stored beside it; a re-run with other settings is refused in
    one line naming them, instead of silently reusing a stage's output that no longer matches the config."""
    if path.exists():
        before = json.loads(path.read_text())
        changed = [k for k in settings if before.get(k) != settings[k]]
        if changed:
            was = ", ".join(f"{k}={before.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise UserError(f"{path.parent} holds {what} of another configuration ({was}); use a new "
                            "distill.output_dir, or delete it to start over")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, default=str))


def _stage_config(cfg: Config, **sections: dict[str, Any]) -> Config:
    """``cfg`` with some keys of some sections changed, each changed section validated again."""
    changed = {name: getattr(cfg, name).model_copy(update=values) for name, values in sections.items()}
    for name, section in changed.items():
        type(section).model_validate(section.model_dump())  # model_copy does not validate: fail here, not later
    return cfg.model_copy(update=changed)


def _distill(cfg: Config, work: Path) -> tuple[int, list[str]]:
    """Rows distilled, and the nodes the vLLM replicas ran on."""
    from medusa_ray import distill

    d = cfg.distill
    _check_fingerprint(work / "distill_settings.json", {
        "model": cfg.model, "distill.mode": d.mode, "distill.temperature": d.temperature, "distill.top_p": d.top_p,
        "distill.max_tokens": d.max_tokens, "distill.seed": d.seed, "distill.endpoint": strip_credentials(d.endpoint) if d.endpoint else None},
        "distilled rows")
    marker = work / "distill_done.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        rows = done["rows_out_total"]
        log.info("distill: already complete (%d rows in %s), skipping", rows, cfg.distill.output_dir)
        return rows, list(done.get("nodes") or [])
    summary = distill.run(cfg)
    print(summary.summary(), flush=True)
    rows = _count_rows(cfg.distill.output_dir)
    marker.write_text(json.dumps({**asdict(summary), "rows_out_total": rows}, default=str, indent=2))
    from medusa_ray import train

    train.track_summary(cfg, {k: v for k, v in asdict(summary).items() if k != "nodes"} | {"rows_out_total": rows},
                        prefix="distill/")
    return rows, summary.nodes


def _count_rows(directory: str) -> int:
    from medusa_ray import parquet

    return sum(parquet.num_rows(p) for p in Path(directory).glob("*.parquet"))


def run(cfg: Config) -> PipelineSummary:
    _check_outputs(cfg)
    init_ray(cfg.ray)
    # The pipeline's own files (held-out split, markers) live in distill's output dir: hold it throughout.
    with hold(cfg.distill.output_dir, "pipeline"):
        return _pipeline(cfg)


def _check_outputs(cfg: Config) -> None:
    """Every stage's output location is writable before the first one starts: an unwritable export directory
    found after an hour of distilling and training costs the hour."""
    check_writable(cfg.distill.output_dir, "distill.output_dir")
    check_writable(cfg.train.storage_path, "train.storage_path")  # object storage: left to its client
    if not is_remote(cfg.export.output_dir):
        check_writable(Path(cfg.export.output_dir).expanduser().resolve().parent, "export.output_dir")
    for key, value in (("eval.output_json", cfg.eval.output_json), ("eval.plot", cfg.eval.plot)):
        if value:
            check_writable(Path(value).expanduser().parent, key)


def _for_method(cfg: Config, method: str, several: bool) -> Config:
    """The config one drafter trains, exports and evaluates with; with several, each its own run and export."""
    train: dict[str, Any] = {"method": method}
    sections: dict[str, dict[str, Any]] = {"train": train}
    if several:
        train["run_name"] = f"{cfg.train.run_name}-{method}"
        sections["export"] = {"output_dir": f"{cfg.export.output_dir.rstrip('/')}-{method}"}
        if cfg.eval.plot:
            plot = Path(cfg.eval.plot)
            sections["eval"] = {"plot": str(plot.with_name(f"{plot.stem}-{method}{plot.suffix}"))}
    return _stage_config(cfg, **sections)


def _drafter_run(cfg: Config) -> dict[str, Any]:
    """Train, export and evaluate one drafter: its numbers for the summary."""
    from medusa_ray import evaluate, export, train

    result = train.run(cfg)
    print("\n" + result.summary() + "\n", flush=True)
    exported = export.run(cfg, checkpoint=result.best_checkpoint or result.checkpoint)
    print(exported.summary(), flush=True)
    export_dir = exported.path
    results = evaluate.run(cfg, draft_dir=str(export_dir), compare_untrained=cfg.eval.compare_untrained)
    print(results.summary(), flush=True)
    untrained = results.get("compared", {}).get("untrained")
    return {
        "result": result,
        "head_top1": result.top1(),
        "expected_acceptance": result.best_validation.get("expected_acceptance"),
        "acceptance_length": results.get("acceptance_length"),
        "acceptance_length_untrained": untrained.get("acceptance_length") if untrained else None,
        "speedup": results.get("speedup"),
        "outputs_identical": results.get("outputs_identical"),
        "train_tokens_per_s": result.tokens_per_s,
        "train_peak_memory_mib": result.peak_memory_mib,
        "train_steps": result.global_step,
        "export_dir": str(export_dir),
        "plots": result.plots + ([results["plot"]] if results.get("plot") else []),
        "nodes": {"train": result.nodes, "export": [exported.marker.get("node_id")], "eval": [results.get("node_id")]},
    }


def _note_comparison(compared: dict[str, dict[str, Any]], fastest: str) -> None:
    """Each export's model card says how it did against the other drafters, and which was faster."""
    from medusa_ray import export

    numbers = ("expected_acceptance", "acceptance_length", "acceptance_length_untrained", "speedup",
               "outputs_identical", "train_tokens_per_s", "train_peak_memory_mib", "train_steps")
    table = {"fastest": fastest, "drafters": {m: {k: c[k] for k in numbers} for m, c in compared.items()}}
    for c in compared.values():
        export.record_comparison(Path(c["export_dir"]), table)


def _bench(cfg: Config, work: Path, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The load benchmark of every drafter trained, against the plain base, through Serve: each run's
    ``speedup`` becomes the one measured at ``eval.target_concurrency`` (eval's offline one is kept as
    ``speedup_offline``), and each export records the table in its card."""
    from medusa_ray import export
    from medusa_ray.serve import bench

    if cfg.eval.bench_plot is None:
        cfg = _stage_config(cfg, eval={"bench_plot": str(work / "bench.png")})
    results = bench.run(cfg, draft_dirs=[r["export_dir"] for r in runs.values()])
    print(results.summary(), flush=True)
    target = results["target_concurrency"]
    for name, measured in results["drafters"].items():
        run = runs[measured["method"]]
        run["speedup_offline"] = run["speedup"]
        run["speedup"] = measured["speedup_at_target"]
        run["speedup_where"] = f"{target} clients"
        run["outputs_identical"] = bool(run["outputs_identical"]) and measured["identical"]
        run["plots"] = run["plots"] + [results["plot"]]
        export.record_bench(Path(run["export_dir"]), results, name)
    if results["best_at_target"] is None:
        log.warning("no drafter beats plain decoding at %d concurrent clients (eval.target_concurrency)", target)
    return results


def push_gate(push_if, acceptance_length: float | None, speedup: float | None, where: str) -> tuple[bool, str]:
    """Whether the measured numbers clear ``export.push_if``, and why, in one line (``where``: what the speed-up
    was measured at). A number that was not measured does not clear its threshold."""
    checks = []
    if push_if.min_acceptance_length is not None:
        checks.append(("acceptance length", acceptance_length, push_if.min_acceptance_length, ""))
    if push_if.min_speedup is not None:
        checks.append(("speed-up", speedup, push_if.min_speedup, f" ({where})"))
    failed, held = [], []
    for name, value, threshold, note in checks:
        shown = "not measured" if value is None else f"{value:.3f}"
        if value is None or value < threshold:
            failed.append(f"{name} {shown}{note} < {threshold:g}")
        else:
            held.append(f"{name} {shown}{note} >= {threshold:g}")
    return not failed, "; ".join(failed or held) or "no thresholds set"


def _publish(cfg: Config, method: str, export_dir: str, acceptance_length: float | None, speedup: float | None,
             where: str) -> tuple[str | None, str | None]:
    """Push the chosen export once eval (and the benchmark) said it pays: ``(hub url, decision)``; one log line
    either way, and nothing is sent to the Hub when a threshold fails."""
    repo, push_if = cfg.export.push_to_hub, cfg.export.push_if
    if not repo or push_if is None:
        return None, None
    ok, why = push_gate(push_if, acceptance_length, speedup, where)
    if not ok:
        decision = f"not pushed to {repo}: {method} falls short of export.push_if ({why})"
        log.warning("export.push_if: %s", decision)
        return None, decision
    from medusa_ray import export

    url = export.push(Path(export_dir), repo, cfg.export.private)
    decision = f"pushed {method} to {url} (export.push_if: {why})"
    log.info("export.push_if: %s", decision)
    return url, decision


def _hold_push(cfg: Config) -> Config:
    """With ``export.push_if``, the stages export without pushing; the pipeline pushes at the end if the numbers
    hold. A missing token is refused now, not after training (the Hub itself is asked only when pushing)."""
    if not (cfg.export.push_to_hub and cfg.export.push_if is not None):
        return cfg
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(f"export.push_to_hub={cfg.export.push_to_hub}: no Hugging Face token (set HF_TOKEN or run "
                        "`hf auth login`)")
    return _stage_config(cfg, export={"push_to_hub": None})


def _pipeline(cfg: Config) -> PipelineSummary:
    work = _work_dir(cfg)
    publish_cfg, cfg = cfg, _hold_push(cfg)
    if cfg.eval.prompts is None:
        cfg = _split_heldout(cfg, work)
    if cfg.eval.plot is None:
        cfg = _stage_config(cfg, eval={"plot": str(work / "eval_acceptance.png")})

    rows, distill_nodes = _distill(cfg, work)
    if rows == 0:
        raise UserError(f"distillation produced no training rows in {cfg.distill.output_dir}; "
                        f"see {cfg.distill.output_dir}/errors")
    methods = cfg.methods
    runs = {m: _drafter_run(_for_method(cfg, m, len(methods) > 1)) for m in methods}
    bench = _bench(cfg, work, runs) if cfg.eval.bench else None
    # The faster drafter leads: by measured speed-up (the load benchmark's at eval.target_concurrency when it
    # ran, else eval's offline one), then by acceptance length.
    fastest = max(runs, key=lambda m: (runs[m]["speedup"] or 0.0, runs[m]["acceptance_length"] or 0.0))
    best = runs[fastest]
    compared = {m: {k: v for k, v in r.items() if k not in ("plots", "nodes", "result", "speedup_where")}
                for m, r in runs.items()} \
        if len(methods) > 1 else {}
    if compared:
        _note_comparison(compared, fastest)
    result = best["result"]
    summary = PipelineSummary(
        rows_distilled=rows,
        train_steps=result.global_step,
        train_resumed_from=result.resumed_from,
        head_top1=best["head_top1"],
        expected_acceptance=best["expected_acceptance"],
        acceptance_length=best["acceptance_length"],
        acceptance_length_untrained=best["acceptance_length_untrained"],
        speedup=best["speedup"],
        outputs_identical=all(r["outputs_identical"] for r in runs.values()),
        export_dir=best["export_dir"],
        method=fastest,
        compared=compared,
        plots=[p for r in runs.values() for p in r["plots"]],
        nodes={"driver": [node_id()], "distill": distill_nodes, **best["nodes"]},
        speedup_where=best.get("speedup_where", "offline eval"),
        bench_table=bench.summary() if bench is not None else None,
    )
    summary.pushed, summary.push_decision = _publish(publish_cfg, fastest, best["export_dir"],
                                                     best["acceptance_length"], best["speedup"],
                                                     best.get("speedup_where", "offline eval"))
    (work / "pipeline_summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary
