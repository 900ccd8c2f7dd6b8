"""The one screen a newcomer reads at the end of the demo."""

from __future__ import annotations

from evaluation.report import short_name
from toyworld.evaluators import JUDGE_LABELS


def format_summary(summary: dict) -> str:
    """The one screen a newcomer reads at the end."""
    comm = summary["community"]["community"]
    realism = comm.get("realism", {})
    lines = [
        "",
        "=" * 72,
        "social-refl demo (toy world)",
        "-" * 72,
        f"community pairs: {comm['n_pairs']} ({comm['oracle_agreement']:.1%} agree with the hidden taste; "
        f"realistic: {realism.get('realistic')}, terms varying but not carried: "
        f"{realism.get('uncarried_varying_terms')})",
    ]
    if "critic" in summary:
        crit = summary["critic"]
        acc, zs = crit["accuracy_vs_oracle"], crit["zero_shot_clip_vs_oracle"]
        lines.append(f"critic vs oracle on held-out pairs: {acc['pairwise_accuracy']:.1%} "
                     f"[{acc['ci95'][0]:.1%}, {acc['ci95'][1]:.1%}]   zero-shot CLIP: "
                     f"{zs['pairwise_accuracy']:.1%}   chance: 50%")
        if crit.get("ceiling"):
            ce = crit["ceiling"]["accuracy_vs_oracle"]
            lines.append("critic ceiling (oracle-ordered pairs of the same feed): "
                         f"{ce['pairwise_accuracy']:.1%}; learning curve: "
                         + ", ".join(f"{c['n_pairs']} pairs "
                                     f"{c['accuracy_vs_oracle']['pairwise_accuracy']:.1%}"
                                     for c in crit.get("learning_curve", [])))
        if crit.get("realism"):
            cr = crit["realism"]
            lines.append(f"realism, critic >= {cr['critic_accuracy_from']:.0%} with its interval above "
                         f"zero-shot: {cr['realistic']}")
    compare = summary.get("compare")
    if compare:
        lines += ["-" * 72] + compare_lines(compare)
    breakdown = summary.get("oracle_breakdown")
    if breakdown:
        for arm, diff in breakdown["difference_from_base"].items():
            moves = sorted(diff.items(), key=lambda kv: -abs(kv[1]["mean"]))[:4]
            lines.append(f"{arm} - base, largest oracle-term moves: "
                         + ", ".join(f"{t} {d['mean']:+.3f}" for t, d in moves))
    p = summary.get("promise")
    if p and "refl_minus_base" in p:
        d = p["refl_minus_base"]
        lines.append(f"promise {'held' if p['held'] else 'did not hold'}: ReFL - base on the oracle "
                     f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (goal: interval above 0, "
                     "fidelity within 5 points)")
    lines += ["-" * 72,
              "stage seconds: " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in summary["timings"].items())]
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    lines.append("=" * 72)
    return "\n".join(lines)


def compare_lines(compare: dict) -> list[str]:
    evaluators = compare["_evaluators"]
    labels = {compare["_selector"]: "critic*", **JUDGE_LABELS}
    short = {s: short_name(s, labels) for s in evaluators}
    lines = ["mean per held-out prompt [95% interval]   (* = the selector / the ReFL reward)",
             f"{'arm':<18}" + "".join(f"{short[s]:>20}" for s in evaluators)]
    for label, row in compare.items():
        if label.startswith("_"):
            continue
        lines.append(f"{label:<18}" + "".join(
            f"{row[s]['mean']:>8.3f} [{row[s]['ci95'][0]:.2f},{row[s]['ci95'][1]:.2f}]" for s in evaluators))
    return lines
