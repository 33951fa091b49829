"""Per-head loss curves of a training run as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of ``metrics.jsonl``; where a restart re-ran steps, the last record of each step wins."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_head_losses(metrics: Iterable[dict] | str | Path, out_png: str | Path) -> Path:
    """Write a PNG with one loss curve per Medusa head (and the weighted total) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if isinstance(metrics, (str, Path)) else sorted(metrics, key=lambda r: r["step"])
    if not rows:
        raise ValueError("no metrics to plot")
    heads = sorted({int(k[len("medusa"):-len("_loss")]) for r in rows for k in r
                    if k.startswith("medusa") and k.endswith("_loss")})
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for k in heads:
        ax.plot(steps, [r.get(f"medusa{k}_loss") for r in rows], label=f"head {k} (token t+{k + 2})")
    ax.plot(steps, [r.get("loss") for r in rows], color="black", linestyle="--", linewidth=1, label="weighted total")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Medusa head losses")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
