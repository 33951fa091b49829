"""A training run's pictures: per-head loss and top-1 curves, and validation over the steps."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

_PER_POSITION = re.compile(r"^(medusa\d+|eagle3_step\d+)_loss$")


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; where a restart re-ran steps, the last record of each step wins."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    fig.clf()
    return out


def plot_head_losses(metrics: Iterable[dict] | str | Path, out_png: str | Path) -> Path:
    """Write a PNG with one loss curve per Medusa head (and the weighted total) and their training top-1."""
    plt = _pyplot()
    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else sorted(metrics, key=lambda r: r["step"])
    if not rows:
        raise ValueError("no metrics to plot")
    # Medusa heads ("medusa0_loss") or EAGLE-3 draft steps ("eagle3_step0_loss").
    names = sorted({m.group(1) for r in rows for key in r if (m := _PER_POSITION.match(key))},
                   key=lambda n: int(re.sub(r"\D", "", n)))
    fig, (loss_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for k, name in enumerate(names):
        label = f"{'step' if name.startswith('eagle3') else 'head'} {k} (token t+{k + 2})"
        loss_ax.plot(steps, [r.get(f"{name}_loss") for r in rows], label=label)
        top1_ax.plot(steps, [r.get(f"{name}_top1") for r in rows], label=label)
    loss_ax.plot(steps, [r.get("loss") for r in rows], color="black", linestyle="--", linewidth=1,
                 label="weighted total")
    loss_ax.set(xlabel="step", ylabel="loss", title="losses per draft position")
    top1_ax.set(xlabel="step", ylabel="top-1 accuracy (training batches)", title="top-1 per draft position",
               ylim=(0, 1))
    for ax in (loss_ax, top1_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    out = _save(fig, out_png)
    plt.close(fig)
    return out


def plot_validation(validation_jsonl: str | Path, out_png: str | Path) -> Path:
    """Write a PNG of validation over the steps: expected acceptance length, and each head's top-1."""
    plt = _pyplot()
    rows = read_metrics(validation_jsonl)
    if not rows:
        raise ValueError("no validation to plot")
    steps = [r["step"] for r in rows]
    fig, (ea_ax, top1_ax) = plt.subplots(1, 2, figsize=(11, 4))
    ea_ax.plot(steps, [r["expected_acceptance"] for r in rows], marker="o", color="tab:green")
    best = max(rows, key=lambda r: r["expected_acceptance"])
    ea_ax.axvline(best["step"], color="grey", linestyle=":", label=f"best: step {best['step']}")
    ea_ax.set(xlabel="step", ylabel="tokens per verification step",
              title="validation: expected acceptance length")
    kind = "step" if (rows[0].get("names") or [""])[0].startswith("eagle3") else "head"
    for k in range(len(rows[0]["top1"])):
        top1_ax.plot(steps, [r["top1"][k] for r in rows], marker=".", label=f"{kind} {k} (token t+{k + 2})")
    top1_ax.set(xlabel="step", ylabel="top-1 accuracy", title=f"validation: {kind} top-1", ylim=(0, 1))
    for ax in (ea_ax, top1_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    out = _save(fig, out_png)
    plt.close(fig)
    return out
