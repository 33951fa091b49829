"""pipeline: distill -> train -> export -> eval on one Ray cluster.

Each stage skips work already complete in its output location, so re-running after a crash continues
where it stopped: distillation is not redone, training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medusa_ray.cluster import init_ray
from medusa_ray.config import Config
from medusa_ray.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class PipelineSummary:
    rows_distilled: int
    train_steps: int
    train_resumed_from: int
    head_top1: list[float]
    acceptance_length: float | None
    acceptance_length_untrained: float | None
    speedup: float | None
    outputs_identical: bool | None
    export_dir: str

    def table(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "-"
            return f"{v:.3f}" if isinstance(v, float) else str(v)

        rows = [
            ("rows distilled", self.rows_distilled),
            ("train steps", f"{self.train_steps}"
                            + (f" (resumed at {self.train_resumed_from})" if self.train_resumed_from else "")),
            ("head top-1 (final)", " ".join(f"{a:.3f}" for a in self.head_top1) or "-"),
            ("acceptance length (trained heads)", self.acceptance_length),
            ("acceptance length (untrained heads)", self.acceptance_length_untrained),
            ("speed-up vs. no speculation", self.speedup),
            ("greedy outputs identical", self.outputs_identical),
            ("export", self.export_dir),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in rows)


def _work_dir(cfg: Config) -> Path:
    path = Path(cfg.distill.output_dir) / "_pipeline"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _split_heldout(cfg: Config, work: Path) -> Config:
    """Hold the last ``eval.num_prompts`` input conversations back from distillation for evaluation.

    The split is written once and reused, so a re-run distills exactly the same conversations.
    """
    from medusa_ray.data import read_conversations

    train_file, heldout_file = work / "distill_prompts.jsonl", work / "heldout_prompts.jsonl"
    if not (train_file.exists() and heldout_file.exists()):
        if not cfg.distill.input:
            raise UserError("distill.input is not set: the pipeline needs prompts to distill")
        read = read_conversations(cfg.distill.input, cfg.distill.format, limit=cfg.distill.limit)
        conversations = read.conversations
        n_eval = min(cfg.eval.num_prompts, len(conversations) // 5)
        if n_eval < 1:
            raise UserError(f"{cfg.distill.input}: too few conversations ({len(conversations)}) to hold any back "
                            "for evaluation; set eval.prompts")
        _write_jsonl(heldout_file, conversations[-n_eval:])
        _write_jsonl(train_file, conversations[:-n_eval])
    overrides = {"distill": {"input": str(train_file), "format": "jsonl", "limit": None},
                 "eval": {"prompts": str(heldout_file)}}
    return _with(cfg, overrides)


def _write_jsonl(path: Path, conversations) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"messages": c.messages}, ensure_ascii=False) + "\n" for c in conversations))
    tmp.replace(path)


def _with(cfg: Config, changes: dict[str, dict[str, Any]]) -> Config:
    tree = cfg.to_dict()
    for section, values in changes.items():
        tree[section].update(values)
    return Config.model_validate(tree)


def _distill(cfg: Config, work: Path) -> int:
    from medusa_ray import distill

    marker = work / "distill_done.json"
    if marker.exists():
        rows = json.loads(marker.read_text())["rows_out_total"]
        log.info("distill: already complete (%d rows in %s), skipping", rows, cfg.distill.output_dir)
        return rows
    summary = distill.run(cfg)
    rows = _count_rows(cfg.distill.output_dir)
    marker.write_text(json.dumps({**asdict(summary), "rows_out_total": rows}, default=str, indent=2))
    _track_distill(cfg, {**asdict(summary), "rows_out_total": rows})
    return rows


def _track_distill(cfg: Config, summary: dict[str, Any]) -> None:
    """Distill's numbers go to the same tracked runs as training's, under ``distill/``."""
    if not cfg.train.tracking:
        return
    from medusa_ray.tracking import open_tracker
    from medusa_ray.train import run_dir

    with open_tracker(cfg, run_dir(cfg)) as tracker:
        tracker.log_summary(summary, prefix="distill/")


def _count_rows(directory: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in Path(directory).glob("*.parquet"))


def _untrained_heads(export_dir: Path, out: Path) -> Path:
    """Heads of the export's shape as training starts them (each one a copy of the base lm_head)."""
    from safetensors.torch import load_file, save_file

    from medusa_ray.export.writer import WEIGHTS_FILE, base_lm_head
    from medusa_ray.model.heads import MedusaHeads

    config = json.loads((export_dir / "config.json").read_text())
    trained = load_file(export_dir / WEIGHTS_FILE)
    heads = MedusaHeads(config["medusa_num_heads"], config["medusa_num_layers"],
                        base_lm_head(config["base_model_name_or_path"]))
    dtype = next(iter(trained.values())).dtype
    tensors = {k: v.to(dtype).contiguous() for k, v in heads.state_dict().items()}
    assert tensors.keys() == trained.keys(), "untrained heads must have the export's layout"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def run(cfg: Config) -> PipelineSummary:
    from medusa_ray import evaluate, export, train

    init_ray(cfg.ray)
    work = _work_dir(cfg)
    if cfg.eval.prompts is None:
        cfg = _split_heldout(cfg, work)

    rows = _distill(cfg, work)
    if rows == 0:
        raise UserError(f"distillation produced no training rows in {cfg.distill.output_dir}; "
                        f"see {cfg.distill.output_dir}/errors")
    result = train.run(cfg)
    export_dir = export.run(cfg, checkpoint=str(result.checkpoint))
    compare = {"untrained": str(_untrained_heads(export_dir, work / "untrained_heads"))} \
        if cfg.eval.compare_untrained else None
    results = evaluate.run(cfg, medusa_dir=str(export_dir), compare=compare)
    untrained = results.get("compared", {}).get("untrained")

    k = cfg.train.medusa_num_heads
    summary = PipelineSummary(
        rows_distilled=rows,
        train_steps=result.global_step,
        train_resumed_from=result.resumed_from,
        head_top1=[float(result.metrics.get(f"medusa{i}_top1", float("nan"))) for i in range(k)],
        acceptance_length=results.get("acceptance_length"),
        acceptance_length_untrained=untrained.get("acceptance_length") if untrained else None,
        speedup=results.get("speedup"),
        outputs_identical=results.get("outputs_identical"),
        export_dir=str(export_dir),
    )
    (work / "pipeline_summary.json").write_text(json.dumps(asdict(summary), indent=2))
    print("\n" + summary.table())
    return summary
