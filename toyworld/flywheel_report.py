"""The flywheel across rounds: the rounds table (flywheel.md), every number (flywheel.json) and the chart of
ReFL minus base per round with its 95% interval, per seed, for the oracle beside the reward and the held-out
judges (flywheel.png)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runkit.config import to_dict
from runkit.files import atomic_write_text, paths_relative_to, write_json
from toyworld.variants import interval_cell, markdown_table

# The judges of a round's comparison, by role (toyworld.flywheel names them so), in the chart's order.
JUDGES = ("oracle", "reward", "zero-shot CLIP", "prompt fidelity")
CRITIC_SETS = {"base": "the base's samples", "start": "the feed model's samples",
               "tuned": "the round's tuned model's samples"}


def _round_row(state: dict) -> dict:
    """The numbers of one round that the summary keeps (round.json keeps everything)."""
    community = (state.get("feedback") or {}).get("community", {})
    over = state.get("overoptimisation") or {}
    return {
        "round": state["round"], "chosen": state["chosen"], "critic_vs_oracle": state["critic_vs_oracle"],
        "judges": {j: state["judges"][j] for j in JUDGES if j in state["judges"]},
        "terms": {t: v["refl_minus_base"] for t, v in state["terms"].items()},
        "gain_over_previous_round": state["oracle_gain_over_previous_round"],
        "win_rate_vs_base": state["win_rate_vs_base"].get("oracle"),
        "feedback": {"n_pairs": community.get("n_pairs"),
                     "oracle_agreement": community.get("oracle_agreement"),
                     **{k: (state.get("feedback") or {}).get(k)
                        for k in ("n_cross_model_pairs", "tuned_won_cross_model")}},
        "overoptimisation": ({k: over.get(k) for k in ("oracle_base", "oracle_peak", "loop_pick")}
                             if over else None),
        "timings": state.get("timings", {}),
    }


def summarise(demo, cfg, per_seed: dict[int, list[dict]]) -> dict:
    """Per seed, each round's numbers; per round, across seeds: the spread of ReFL minus base per judge and of
    the gain over the previous round, and how many seeds have each interval above / below 0."""
    from toyworld.study import _spread

    rows = {seed: [_round_row(s) for s in rounds] for seed, rounds in per_seed.items()}
    across = []
    for r in range(cfg.n_rounds + 1):
        at = [rounds[r] for rounds in rows.values()]
        entry = {"round": r, "judges": {}}
        for judge in JUDGES:
            diffs = [a["judges"][judge]["refl_minus_base"] for a in at if judge in a["judges"]]
            if diffs:
                entry["judges"][judge] = {**_spread([d["mean"] for d in diffs]),
                                          "seeds_above_zero": sum(d["ci95"][0] > 0 for d in diffs),
                                          "seeds_below_zero": sum(d["ci95"][1] < 0 for d in diffs)}
        gains = [a["gain_over_previous_round"] for a in at]
        entry["gain_over_previous_round"] = {**_spread([g["mean"] for g in gains]),
                                             "seeds_above_zero": sum(g["ci95"][0] > 0 for g in gains)}
        measured = at[0]["critic_vs_oracle"]["critic"]
        entry["critic_vs_oracle"] = {
            name: _spread([a["critic_vs_oracle"]["critic"][name]["pairwise_accuracy"] for a in at])
            for name in CRITIC_SETS if name in measured}
        across.append(entry)
    return {"demo": str(demo.folder), "seeds": sorted(rows), "n_rounds": cfg.n_rounds,
            "config": to_dict(cfg), "per_seed": rows, "across_seeds": across}


def _pct(report: dict | None) -> str:
    return "-" if not report else f"{100 * report['pairwise_accuracy']:.1f}%"


def _spread_cell(d: dict, digits: int = 3) -> str:
    return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}"


def flywheel_markdown(summary: dict) -> str:
    """The rounds table across seeds, then per seed each round's numbers with their intervals."""
    seeds = summary["seeds"]
    lines = [f"Flywheel on {summary['demo']}: rounds 0-{summary['n_rounds']}, training seeds "
             f"{', '.join(map(str, seeds))}. ReFL minus base on the demo's held-out comparison prompts (the "
             "same prompts and seeds every round), mean ± std over seeds (seeds whose per-prompt 95% "
             "interval is above / below 0); the critic against the oracle on held-out pairs of the base's "
             "samples, of the feed model's (round r-1's tuned model) and of the round's tuned model.", ""]
    header = ["round", *(f"{j} - base" for j in JUDGES), "gain over previous round (oracle)",
              *(f"critic on {name}" for name in CRITIC_SETS)]
    rows = []
    for entry in summary["across_seeds"]:
        cells = [str(entry["round"])]
        for j in JUDGES:
            d = entry["judges"].get(j)
            cells.append("-" if d is None else f"{_spread_cell(d)} ({d['seeds_above_zero']}↑ "
                                               f"{d['seeds_below_zero']}↓)")
        g = entry["gain_over_previous_round"]
        cells.append(f"{_spread_cell(g)} ({g['seeds_above_zero']}↑)")
        accuracy = entry["critic_vs_oracle"]
        cells += [f"{100 * accuracy[n]['mean']:.1f}%" if n in accuracy else "-" for n in CRITIC_SETS]
        rows.append(cells)
    lines += markdown_table(header, rows) + [""]
    for seed in seeds:
        lines += [f"### Seed {seed}", ""]
        rows = []
        for row in summary["per_seed"][seed]:
            c = row["chosen"]
            acc, prev = row["critic_vs_oracle"]["critic"], row["critic_vs_oracle"]["previous_critic"]
            fb = row["feedback"]
            over = row["overoptimisation"] or {}
            peak = over.get("oracle_peak") or {}
            pick = over.get("loop_pick") or {}
            rows.append([
                str(row["round"]), f"{c['setting']}, update {c['update']}"
                + ("" if c.get("admissible", True) else " (none admissible: kept the start)"),
                interval_cell(row["judges"]["oracle"]["refl_minus_base"]),
                interval_cell(row["gain_over_previous_round"]),
                interval_cell(row["judges"]["prompt fidelity"]["refl_minus_base"]),
                interval_cell(row["judges"]["zero-shot CLIP"]["refl_minus_base"]),
                "-" if row["win_rate_vs_base"] is None else f"{row['win_rate_vs_base']['mean']:.1%}",
                " / ".join(f"{_pct(acc.get(n))} ({_pct(prev.get(n))})" for n in CRITIC_SETS),
                "-" if fb["n_pairs"] is None else
                f"{fb['n_pairs']} ({fb['oracle_agreement']:.0%} agree; {fb['n_cross_model_pairs']} "
                "cross-model, "
                + ("-" if fb["tuned_won_cross_model"] is None else f"{fb['tuned_won_cross_model']:.0%}")
                + " won by the tuned model)",
                "-" if not peak else f"peak {peak['oracle']:.3f} at {peak['update']}; pick "
                + ("-" if not pick else f"{pick['from_start']:+.3f} from its start"),
            ])
        lines += markdown_table(["round", "ReFL (the rule's choice)", "oracle - base",
                                 "oracle - previous round",
                                 "fidelity - base", "zero-shot CLIP - base", "oracle win rate vs base",
                                 "critic vs oracle: base / feed model / tuned (previous critic)", "new pairs",
                                 "validation curve (oracle)"], rows) + [""]
    return "\n".join(lines)


def plot_rounds(summary: dict, out_png: Path) -> Path:
    """One panel per judge (the oracle first): ReFL minus base per round, each seed's mean with its 95%
    interval over prompts, and 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = summary["seeds"]
    fig, axes = plt.subplots(1, len(JUDGES), figsize=(3.4 * len(JUDGES), 3.2), sharex=True)
    for ax, judge in zip(axes, JUDGES):
        for k, seed in enumerate(seeds):
            rows = [r for r in summary["per_seed"][seed] if judge in r["judges"]]
            x = np.array([r["round"] for r in rows]) + 0.08 * (k - (len(seeds) - 1) / 2)
            d = [r["judges"][judge]["refl_minus_base"] for r in rows]
            mean = np.array([v["mean"] for v in d])
            err = np.array([[v["mean"] - v["ci95"][0] for v in d], [v["ci95"][1] - v["mean"] for v in d]])
            ax.errorbar(x, mean, yerr=err, fmt="o-", capsize=3, markersize=4, label=f"seed {seed}")
        ax.axhline(0.0, color="grey", linewidth=1)
        ax.set_title(f"{judge} - base" + (" (hidden taste)" if judge == "oracle" else ""), fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(range(summary["n_rounds"] + 1))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_summary(summary: dict, root: Path) -> None:
    """flywheel.json (paths relative to the demo) and flywheel.md (the tables and the chart)."""
    write_json(root / "flywheel.json", paths_relative_to(summary, root.parent))
    atomic_write_text(root / "flywheel.md",
                      flywheel_markdown(summary) + "\n![ReFL minus base per round](flywheel.png)\n")
