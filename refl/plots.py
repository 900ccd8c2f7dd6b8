"""Pictures of a ReFL run, drawn from its metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

from runkit.logs import read_metrics

HELDOUT = "eval/heldout/"  # refl.guard.HELDOUT_PREFIX (plots stay importable without the guard's imports)


def _eval_keys(records: list[dict]) -> list[str]:
    """eval/reward, then each eval/heldout/<spec> judge, then eval/diversity: what validation logged."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/")))
    return sorted(keys, key=lambda k: (k != "eval/reward", k == "eval/diversity", keys.index(k)))


def plot_curve(metrics_path: Path, out_png: Path, best_update: int | None = None,
               first: str = "train/reward") -> Path | None:
    """Training reward and loss against updates, then one panel per validation metric (eval/reward,
    each held-out judge, eval/diversity: the judges live on different scales, so each gets its own
    axis); `best_update` (the LoRA train.select_by kept) is marked by a vertical line in every panel.
    `first`: the training metric of the first panel (a trainer without a reward names its own)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    rows = [r for r in records if first in r]
    if not rows:
        return None
    evals = _eval_keys(records)
    panels = list(dict.fromkeys([first, "train/loss"])) + [k for k in evals if k != "eval/reward"]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        source = rows if key.startswith("train/") else [r for r in records if key in r]
        ax.plot([r["update"] for r in source], [r[key] for r in source],
                "-" if key.startswith("train/") else "o-",
                label="training batches" if key == first else None)
        ax.set_xlabel("update")
        title = "held-out " + key.removeprefix(HELDOUT) if key.startswith(HELDOUT) else key
        ax.set_title(title, fontsize=9)
        if best_update is not None:
            ax.axvline(best_update, color="tab:red", linestyle="--", linewidth=1,
                       label=f"best (update {best_update})")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    val = [r for r in records if "eval/reward" in r]
    if val:
        axes[0, 0].plot([r["update"] for r in val], [r["eval/reward"] for r in val], "o-", label="validation")
    if val or best_update is not None:
        axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
