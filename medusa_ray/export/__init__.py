"""export: turn a training checkpoint into a directory that vLLM (and, for Medusa, TGI) loads; optionally push it.

    medusa-ray export [--checkpoint CKPT] [--output DIR] [--push-to-hub ORG/NAME] [--private] [--overwrite]

The export dir holds the drafter's own files (``Drafter.export_files``: Medusa's ``medusa_lm_head.safetensors``
and ``config.json``, EAGLE-3's speculators layout), ``README.md`` (model card) and ``medusa_ray_export.json`` (where
it came from). ``run`` returns an ``ExportResult``; its ``summary()`` is what the CLI prints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medusa_ray import checkpoint, drafters
from medusa_ray.config import Config
from medusa_ray.errors import UserError
from medusa_ray.export.card import BENCH_FILE, write_model_card
from medusa_ray.export.files import (
    CARD_FILE,
    COMPARISON_FILE,
    EVAL_FILE,
    EXPORT_FORMAT,
    LOCAL_FILE,
    MARKER_FILE,
    local_base,
    read_marker,
)
from medusa_ray.export.hub import HubTarget, prepare_push, upload
from medusa_ray.export.public import public_eval, public_meta, redact, source_id
from medusa_ray.export.writer import base_dtype, check_base, resolve_base, write_export
from medusa_ray.locks import hold
from medusa_ray.paths import is_hub_id, is_remote
from medusa_ray.writable import check_writable

__all__ = ["run", "ExportResult", "push", "record_bench", "public_bench", "BENCH_FILE", "record_eval", "record_comparison", "read_marker", "local_base", "write_model_card",
           "COMPARISON_FILE", "EVAL_FILE", "MARKER_FILE"]

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    path: Path
    """The export directory."""
    marker: dict
    """Its ``medusa_ray_export.json``: source, base model, dtype, the checkpoint's public meta."""
    checkpoint: str
    hub_url: str | None = None
    reused: bool = False
    """True when the directory already held exactly this export (nothing was rewritten)."""

    def summary(self) -> str:
        meta = self.marker["meta"]
        drafter = drafters.get(meta.get("method", "medusa"))
        size = (self.path / drafter.weights_file).stat().st_size / 2**20
        rows = [
            ("export", f"{self.path}{' (already up to date)' if self.reused else ''}"),
            ("base model", self.marker["base_model"]),
            ("checkpoint", f"{self.checkpoint} (step {meta['global_step']})"),
            drafter.describe(meta),
            ("weights", f"{drafter.weights_file} {size:.1f} MiB {self.marker['dtype']}"),
        ]
        if self.hub_url:
            rows.append(("hub", self.hub_url))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _checkpoint_path(cfg: Config, given: str | None) -> str:
    if given:
        return given if is_remote(given) else str(Path(given).expanduser().resolve())
    found = checkpoint.run_checkpoints(cfg.train.storage_path, cfg.train.run_name)
    best = checkpoint.best_checkpoint(found)
    if best is None:
        raise UserError(f"no checkpoint found for run {cfg.train.run_name!r} under {cfg.train.storage_path}; "
                        "train first or pass --checkpoint")
    why = (f"best validation expected acceptance {best.score:.3f} of {len(found)} checkpoint(s)"
           if best.score is not None else "the latest; no checkpoint has a validation score")
    print(f"exporting step {best.step} of run {cfg.train.run_name!r}: {why}", flush=True)
    return best.uri if is_remote(best.uri) else str(Path(best.uri).resolve())


def _check_output(out: Path, source: dict, overwrite: bool) -> bool:
    """True when ``out`` already holds this very export; refuse to clobber anything else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"export output {out} exists and is not a directory")
    if not any(out.iterdir()):
        return False
    marker = read_marker(out)
    if marker is None:
        # Even --overwrite never deletes a directory we did not write.
        raise UserError(f"export output {out} is not empty and holds no medusa-ray export; choose a new directory")
    if overwrite:
        return False
    if marker.get("source") == source:
        return True
    theirs = marker.get("source", {})
    raise UserError(f"export output {out} already holds a different export (from {theirs.get('checkpoint')} "
                    f"step {theirs.get('global_step')}); pass --overwrite to replace it")


def _push(out: Path, marker: dict, hub: HubTarget) -> str:
    """Name the Hub repo in the card's serve commands, upload; if the upload fails, put the files back."""
    saved = {name: (out / name).read_bytes() for name in (MARKER_FILE, CARD_FILE) if (out / name).is_file()}
    if marker.get("location") != hub.repo_id:
        marker["location"] = hub.repo_id
        (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        write_model_card(out)
    try:
        return upload(hub, out)
    except UserError as exc:
        for name, content in saved.items():
            (out / name).write_bytes(content)
        raise UserError(f"{exc}; the export in {out} is unchanged") from None


def output_dir(cfg: Config) -> Path:
    """``export.output_dir`` as an absolute local path; object storage is refused in one line."""
    if is_remote(cfg.export.output_dir):
        raise UserError(f"export.output_dir={cfg.export.output_dir}: must be a local or shared-filesystem path "
                        "(vLLM and TGI load the export from a directory); push it with export.push_to_hub")
    return Path(cfg.export.output_dir).expanduser().resolve()


def run(cfg: Config, checkpoint: str | None = None) -> ExportResult:
    """Export the drafter of ``checkpoint`` (default: the best of ``train.run_name``) to ``export.output_dir``.

    Writing runs as a Ray task on a worker node when Ray is up (the job driver's head node has no memory
    to spare); the push happens here.
    """
    ckpt_path = _checkpoint_path(cfg, checkpoint)
    out = output_dir(cfg)
    check_writable(out.parent, "export.output_dir")  # the export is built beside it, then swapped in
    # A push that would fail, fails now: before anything is written.
    hub = prepare_push(cfg.export.push_to_hub, cfg.export.private) if cfg.export.push_to_hub else None
    with hold(out, "export"):  # one writer: the export dir is swapped in whole, and pushed as it is
        return _export(cfg, ckpt_path, out, hub)


def _export(cfg: Config, ckpt_path: str, out: Path, hub: HubTarget | None) -> ExportResult:
    from medusa_ray.cluster import run_task

    reused = run_task(write, cfg.to_dict(), ckpt_path, str(out), name="medusa-ray-export", num_cpus=1)
    marker = read_marker(out)
    if marker is None:
        raise UserError(f"export output {out} was written on a node whose filesystem this process does not see; "
                        "put export.output_dir on storage every node shares")
    hub_url = _push(out, marker, hub) if hub is not None else None
    return ExportResult(path=out, marker=marker, checkpoint=ckpt_path, hub_url=hub_url, reused=reused)


def write(cfg_dict: dict, ckpt_path: str, out_dir: str) -> bool:
    """Write the drafter of ``ckpt_path`` into ``out_dir``; False when ``out_dir`` already holds exactly this
    export."""
    from medusa_ray.cluster import node_id

    cfg = Config.model_validate(cfg_dict)
    out = Path(out_dir)
    with checkpoint.local_copy(ckpt_path) as ckpt:
        meta = checkpoint.read_meta(ckpt)
        where = str(Path(ckpt) / checkpoint.META_FILE)
        drafter = drafters.get(meta.method)
        meta.require(drafter.meta_keys, where)
        flat = meta.flat()
        source = {"checkpoint": redact(ckpt_path), "id": source_id(ckpt_path), "global_step": meta.global_step}
        if _check_output(out, source, cfg.export.overwrite):
            return True
        base_name, base_cfg = resolve_base([meta.base_model, cfg.model])
        check_base(flat, base_name, base_cfg)
        weights = checkpoint.read_weights(ckpt)
        drafter.check_weights(weights, flat, ckpt)
        dtype = base_dtype(base_cfg)
        # A local base is published by a redacted name (no home directories in a public repo); its path stays in
        # LOCAL_FILE, which is never uploaded.
        published = base_name if is_hub_id(base_name) else redact(base_name)
        drafter_files = drafter.export_files(weights, flat, base_name, dtype, published)

        def files(tmp: Path) -> None:
            drafter_files(tmp)
            (tmp / LOCAL_FILE).write_text(json.dumps({"base_model": base_name, "location": str(out)}) + "\n")

        marker = {
            "format": EXPORT_FORMAT,
            "source": source,
            "base_model": published,
            "base_is_local": not is_hub_id(base_name),
            "dtype": str(dtype).removeprefix("torch."),
            "location": cfg.export.push_to_hub or redact(str(out)),
            "node_id": node_id(),
            "meta": public_meta(flat),
        }
        write_export(out, marker, files)
    return False


def push(export_dir: Path, repo_id: str, private: bool | None = None) -> str:
    """Push an export already written (the pipeline's push once ``export.push_if`` holds): the same checks,
    card and upload as ``export --push-to-hub``, under the export's lock. Returns the repo URL."""
    out = Path(export_dir)
    hub = prepare_push(repo_id, private)
    with hold(out, "export"):
        marker = read_marker(out)
        if marker is None:
            raise UserError(f"{out} holds no medusa-ray export; nothing to push")
        return _push(out, marker, hub)


def record_eval(export_dir: Path, results: dict) -> None:
    """Eval's numbers into the export (only what may be published: no outputs, no paths) and a refreshed card,
    under the export's lock (an export being rewritten is not annotated half-way)."""
    _record(Path(export_dir), EVAL_FILE, public_eval(results))


_BENCH_LEVEL_KEYS = ("requests", "ok", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_per_s",
                     "output_tokens", "speedup", "identical")
_BENCH_DRAFTER_KEYS = ("method", "num_speculative_tokens", "acceptance_length", "stops_paying_at",
                       "speedup_at_target", "identical")


def public_bench(bench: dict, this: str) -> dict:
    """The load benchmark as an export may publish it: numbers only (no URL, paths, outputs or errors)."""
    return {
        "this": this,
        "target_concurrency": bench.get("target_concurrency"),
        "max_tokens": bench.get("max_tokens"),
        "best_at_target": bench.get("best_at_target"),
        "levels": [{"concurrency": lv["concurrency"],
                    "models": {name: {k: m.get(k) for k in _BENCH_LEVEL_KEYS if k in m}
                               for name, m in lv["models"].items()}} for lv in bench.get("levels", [])],
        "drafters": {name: {k: d.get(k) for k in _BENCH_DRAFTER_KEYS if k in d}
                     for name, d in (bench.get("drafters") or {}).items()},
    }


def record_bench(export_dir: Path, bench: dict, this: str) -> None:
    """The load benchmark's numbers into the export (``this``: its model in the benchmark) and a refreshed card."""
    _record(Path(export_dir), BENCH_FILE, public_bench(bench, this))


def record_comparison(export_dir: Path, table: dict) -> None:
    """The pipeline's side-by-side numbers of several drafters into the export, and a refreshed card."""
    _record(Path(export_dir), COMPARISON_FILE, table)


def _record(export_dir: Path, name: str, content: dict) -> None:
    with hold(export_dir, "export"):
        if read_marker(export_dir) is None:
            raise UserError(f"{export_dir} holds no medusa-ray export; not writing {name} into it")
        path = export_dir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(content, indent=2) + "\n")
        tmp.replace(path)
        write_model_card(export_dir)
