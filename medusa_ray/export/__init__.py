"""export: turn a training checkpoint into a directory that vLLM and TGI load, optionally push it.

    medusa-ray export [--checkpoint CKPT] [--output DIR] [--push-to-hub ORG/NAME] [--private] [--overwrite]

The export dir holds ``medusa_lm_head.safetensors`` (FasterDecoding/TGI keys), ``config.json`` (read by both
servers; see ``writer`` for the exact rules), the base tokenizer, ``README.md`` (model card) and
``medusa_ray_export.json`` (where it came from). ``share_lm_head`` heads are written with a copy of the base
``lm_head`` as every head's projection, the one layout both servers accept.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from medusa_ray.config import Config
from medusa_ray.errors import UserError
from medusa_ray.locks import hold
from medusa_ray.writable import check_writable
from medusa_ray.export.card import write_model_card
from medusa_ray.export.checkpoint import check_heads, is_remote, local_checkpoint, read_heads, read_meta
from medusa_ray.export.hub import HubTarget, prepare_push, upload
from medusa_ray.export.public import public_meta, redact, source_id
from medusa_ray.export.writer import (
    COMPARISON_FILE,
    EVAL_FILE,
    EXPORT_FORMAT,
    MARKER_FILE,
    WEIGHTS_FILE,
    base_dtype,
    check_base,
    head_tensors,
    medusa_config,
    read_marker,
    resolve_base,
    write_export,
    write_medusa_files,
)

__all__ = ["run", "write_model_card", "COMPARISON_FILE", "EVAL_FILE", "MARKER_FILE", "WEIGHTS_FILE"]

log = logging.getLogger(__name__)


def _checkpoint_path(cfg: Config, checkpoint: str | None) -> str:
    if checkpoint:
        return checkpoint if is_remote(checkpoint) else str(Path(checkpoint).expanduser().resolve())
    from medusa_ray.train.checkpoints import best_checkpoint, run_checkpoints, validation_score

    found = run_checkpoints(cfg.train.storage_path, cfg.train.run_name)
    best = best_checkpoint(found)
    if best is None:
        raise UserError(f"no checkpoint found for run {cfg.train.run_name!r} under {cfg.train.storage_path}; "
                        "train first or pass --checkpoint")
    score = validation_score(best)
    why = (f"best validation expected acceptance {score:.3f} of {len(found)} checkpoint(s)" if score is not None
           else "the latest; no checkpoint has a validation score")
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


def _print_summary(out: Path, marker: dict, checkpoint: str, hub_url: str | None, reused: bool) -> None:
    meta = marker["meta"]
    if meta.get("method") == "eagle3":
        from medusa_ray.export import eagle3

        weights, drafter = eagle3.WEIGHTS_FILE, ("drafter", eagle3.describe(meta))
    else:
        weights = WEIGHTS_FILE
        drafter = ("heads x layers", f"{meta['medusa_num_heads']} x {meta['medusa_num_layers']}"
                                     f"{' (shared lm_head)' if meta['share_lm_head'] else ''}")
    size = (out / weights).stat().st_size / 2**20
    rows = [
        ("export", f"{out}{' (already up to date)' if reused else ''}"),
        ("base model", marker["base_model"]),
        ("checkpoint", f"{checkpoint} (step {meta['global_step']})"),
        drafter,
        ("weights", f"{weights} {size:.1f} MiB {marker['dtype']}"),
    ]
    if hub_url:
        rows.append(("hub", hub_url))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _push(out: Path, marker: dict, hub: HubTarget) -> str:
    """Name the Hub repo in the card's serve commands, upload; if the upload fails, put the files back."""
    saved = {name: (out / name).read_bytes() for name in (MARKER_FILE, "README.md") if (out / name).is_file()}
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


def run(cfg: Config, checkpoint: str | None = None) -> Path:
    """Export the heads of ``checkpoint`` (default: the best of ``train.run_name``) to ``export.output_dir``.

    Writing runs as a Ray task on a worker node when Ray is up (the job driver's head node has no memory
    to spare); the push and the summary happen here.
    """
    ckpt_path = _checkpoint_path(cfg, checkpoint)
    out = output_dir(cfg)
    check_writable(out.parent, "export.output_dir")  # the export is built beside it, then swapped in
    # A push that would fail, fails now: before anything is written.
    hub = prepare_push(cfg.export.push_to_hub, cfg.export.private) if cfg.export.push_to_hub else None
    with hold(out, "export"):  # one writer: the export dir is swapped in whole, and pushed as it is
        return _export(cfg, ckpt_path, out, hub)


def _export(cfg: Config, ckpt_path: str, out: Path, hub: HubTarget | None) -> Path:
    from medusa_ray.cluster import run_task

    reused = run_task(write, cfg.to_dict(), ckpt_path, str(out), name="medusa-ray-export", num_cpus=1)
    marker = read_marker(out)
    if marker is None:
        raise UserError(f"export output {out} was written on a node whose filesystem this process does not see; "
                        "put export.output_dir on storage every node shares")
    hub_url = None
    if hub is not None:
        hub_url = _push(out, marker, hub)
    _print_summary(out, marker, ckpt_path, hub_url, reused)
    return out


def write(cfg_dict: dict, ckpt_path: str, out_dir: str) -> bool:
    """Write the heads of ``ckpt_path`` into ``out_dir``; False when ``out_dir`` already holds exactly this export."""
    from medusa_ray.cluster import node_id

    cfg = Config.model_validate(cfg_dict)
    out = Path(out_dir)
    with local_checkpoint(ckpt_path) as ckpt:
        meta = read_meta(ckpt)
        source = {"checkpoint": redact(ckpt_path), "id": source_id(ckpt_path), "global_step": int(meta["global_step"])}
        if _check_output(out, source, cfg.export.overwrite):
            return True
        base_name, base_cfg = resolve_base([meta["base_model"], cfg.model])
        check_base(meta, base_name, base_cfg)
        state_dict = read_heads(ckpt)
        dtype = base_dtype(base_cfg)
        if meta["method"] == "eagle3":
            from medusa_ray.export import eagle3

            draft = eagle3.draft_from_checkpoint(state_dict, meta, base_name)
            files = functools.partial(eagle3.write_files, draft=draft, dtype=dtype)
        else:
            check_heads(state_dict, meta, ckpt)
            tensors = head_tensors(state_dict, meta, base_name, dtype)
            files = functools.partial(write_medusa_files, tensors=tensors, config=medusa_config(meta, base_name),
                                      base_name=base_name)
        marker = {
            "format": EXPORT_FORMAT,
            "source": source,
            "base_model": base_name,
            "dtype": str(dtype).removeprefix("torch."),
            "location": cfg.export.push_to_hub or str(out),
            "node_id": node_id(),
            "meta": public_meta(meta),
        }
        write_export(out, marker, files)
    return False
