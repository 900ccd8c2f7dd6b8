"""Pictures of a ReFL run, drawn from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from runkit.logs import read_metrics


def plot_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Reward and loss against updates, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    rows = [r for r in records if "train/reward" in r]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ["train/reward", "train/loss"]):
        ax.plot([r["update"] for r in rows], [r[key] for r in rows])
        ax.set_xlabel("update")
        ax.set_title(key)
    evals = [r for r in records if "eval/reward" in r]
    if evals:
        axes[0].plot([r["update"] for r in evals], [r["eval/reward"] for r in evals], "o-", label="validation")
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
