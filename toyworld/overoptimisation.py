"""Reward over-optimisation on a ReFL run's validation curves: where the hidden taste (the oracle, evaluation
only) peaks while the reward keeps rising, and where each guard a user could run would stop or select.

Gao et al. (2023) describe the shape: the gold reward rises, peaks and falls as the proxy keeps rising. A
guard helps when it lands near the gold peak without seeing the gold; here the guards see only the reward, the
zero-shot CLIP and prompt fidelity on the validation prompts (refl.sweep.guard_picks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from refl.sweep import guard_picks, validations
from toyworld.rule import rule_for

ORACLE = "eval/heldout/oracle:"


def user_judges(clip_model: str) -> dict[str, str]:
    """The held-out judges a user has, label -> validation metric."""
    return {"zero-shot CLIP": f"eval/heldout/clip:{clip_model}", "prompt fidelity": "eval/heldout/fidelity:"}


def analyse(records: Sequence[dict], clip_model: str) -> dict | None:
    """The oracle's peak on the validation curve and each guard's pick with the oracle there and its distance
    from the peak; None when the run has no oracle-judged validation from update 0."""
    rows = validations(records)
    if not rows or ORACLE not in rows[0] or int(rows[0]["update"]) != 0:
        return None
    oracle = {int(r["update"]): r[ORACLE] for r in rows}
    peak = max(oracle, key=lambda u: (oracle[u], -u))
    picks = guard_picks(rows, user_judges(clip_model), rule_for(clip_model))
    picks["no guard (last update)"] = int(rows[-1]["update"])
    return {"oracle_base": oracle[0], "oracle_peak": {"update": peak, "oracle": oracle[peak]},
            "reward": {str(int(r["update"])): r["eval/reward"] for r in rows},
            "picks": {label: {"update": u, "oracle": oracle[u], "from_peak": oracle[u] - oracle[peak],
                              "from_base": oracle[u] - oracle[0]} for label, u in picks.items()}}


def plot(records: Sequence[dict], analysis: dict, clip_model: str, out_png: Path) -> Path:
    """The reward, the user's judges and the oracle against updates, one panel each on a shared axis; the
    oracle's peak and each guard's pick marked in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = validations(records)
    panels = {"reward (critic, validation prompts)": "eval/reward",
              **{f"{k} (held out)": v for k, v in user_judges(clip_model).items()},
              "oracle (hidden taste, evaluation only)": ORACLE}
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.9 * len(panels)), sharex=True)
    updates = [int(r["update"]) for r in rows]
    marks = sorted({(p["update"], label) for label, p in analysis["picks"].items()})
    colours = plt.get_cmap("tab10")
    for ax, (title, key) in zip(axes, panels.items()):
        ax.plot(updates, [r[key] for r in rows], "o-", color="black", markersize=3)
        ax.set_title(title, fontsize=9)
        ax.axvline(analysis["oracle_peak"]["update"], color="tab:red", linewidth=2, alpha=0.4,
                   label=f"oracle peak (update {analysis['oracle_peak']['update']})")
        for i, (u, label) in enumerate(marks):
            ax.axvline(u + 0.4 * (i - len(marks) / 2), color=colours(i), linestyle="--", linewidth=1,
                       label=f"{label}: {u}")
    axes[0].legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("update")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
