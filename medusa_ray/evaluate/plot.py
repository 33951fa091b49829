"""PNG of the evaluation: acceptance rate per speculative position (trained next to untrained heads when both were
measured), and per-head accuracy when measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(results: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    accuracy = results.get("head_accuracy")
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(11 if accuracy else 6, 4), squeeze=False)
    ax = axes[0][0]
    rates = results["accepted_per_position"]
    untrained = (results.get("compared") or {}).get("untrained", {}).get("accepted_per_position")
    positions = range(len(rates))
    if untrained:
        # Side by side: what training bought at each position.
        ax.bar([i - 0.2 for i in positions], rates, 0.4, color="tab:blue", label="trained")
        ax.bar([i + 0.2 for i in positions], untrained[:len(rates)], 0.4, color="tab:gray", label="untrained")
        ax.set_xticks(list(positions), [str(i + 1) for i in positions])
        ax.legend()
    else:
        ax.bar([str(i + 1) for i in positions], rates, color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_xlabel("speculative position")
    ax.set_ylabel("acceptance rate")
    ax.set_title(f"acceptance length {results['acceptance_length']:.2f}, speed-up {results['speedup']:.2f}x")
    if accuracy:
        ax = axes[0][1]
        heads = list(accuracy)
        topk = len(accuracy[heads[0]])
        width = 0.8 / topk
        for i in range(topk):
            ax.bar([h + i * width for h in range(len(heads))], [accuracy[h][i] for h in heads], width,
                   label=f"top-{i + 1}")
        ax.set_xticks([h + 0.4 - width / 2 for h in range(len(heads))], heads)
        ax.set_ylim(0, 1)
        ax.set_ylabel("teacher-forced accuracy")
        ax.set_title("per-head accuracy (held-out)")
        ax.legend()
    fig.tight_layout()
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
