"""The demo's own sections of report.html (the promise right after the verdict, the rest after the
comparison's summary table), its title and how it names its judges."""

from __future__ import annotations

import html
import json
from pathlib import Path


def question(n_samples: int) -> str:
    """The demo's report title: the question the toy world answers."""
    return (f"Does tuning on the community's feedback raise its taste? ReFL and best-of-{n_samples} by the "
            "critic, judged by the hidden oracle")

# The judge of truth in the toy world: the community's hidden taste (an evaluator spec).
ORACLE = "oracle:"


def demo_labels(selector: str) -> dict[str, str]:
    """The demo's judges as its tables name them: the selector (the community's critic) as "critic", the
    toy world's own judges by kind (toyworld.evaluators.JUDGE_LABELS)."""
    from toyworld.evaluators import JUDGE_LABELS

    return {selector: "critic", **JUDGE_LABELS}


def arms_section(out: Path) -> str:
    """The arms study's table (social-refl-world-arms: DPO, KTO, ReFL and best-of-N on the community's own
    feedback) when it has run on this demo, with a link to its report; empty otherwise."""
    table = out / "arms" / "arms.json"
    if not table.is_file():
        return ""
    from toyworld.arms import arms_table_html

    return arms_table_html(json.loads(table.read_text()))


def breakdown_section(breakdown: dict) -> str:
    """The per-term table of `oracle_breakdown`, for report.html."""
    arms = list(breakdown["mean"])
    diffs = breakdown["difference_from_base"]
    head = "".join(f"<th>{html.escape(a)}</th>" for a in arms) + "".join(
        f"<th>{html.escape(a)} - base [95%]</th>" for a in diffs)
    rows = []
    for term, weight in breakdown["weights"].items():
        cells = "".join(f"<td>{breakdown['mean'][a][term]:.3f}</td>" for a in arms)
        cells += "".join(f"<td>{d[term]['mean']:+.3f} [{d[term]['ci95'][0]:+.3f}, "
                         f"{d[term]['ci95'][1]:+.3f}]</td>"
                         for d in diffs.values())
        rows.append(f"<tr><td>{term} (x{weight:g})</td>{cells}</tr>")
    return ("<h2>Where the hidden taste moved</h2><p class='note'>The oracle is a weighted mean of these "
            "terms. A rise in the critic with a fall in a term the community values is reward hacking.</p>"
            f"<table><tr><th>oracle term (weight)</th>{head}</tr>{''.join(rows)}</table>")


def realism_text(comm: dict) -> str:
    """The community's realism criteria and where these pairs stand, as a sentence for the report."""
    r, spread = comm.get("realism"), comm.get("term_spread")
    if not r:
        return ""
    lo, hi = r["criteria"]["agreement_range"]
    varies, carried_from = r["criteria"]["term_varies_above"], r["criteria"]["term_carried_from"]
    verdict = "meets both" if r["realistic"] else "misses " + " and ".join(
        (["the agreement range"] if not r["agreement_in_human_range"] else [])
        + ([f"the carried-term rule for {', '.join(r['uncarried_varying_terms'])}"]
           if r["uncarried_varying_terms"]
           else []))
    spread_text = ", ".join(f"{t} {v:.2f}" for t, v in spread.items()) if spread else "n/a"
    return ("Realism criteria, fixed before any method was measured: pairs agree with the oracle within "
            f"human annotators' range ({lo:.0%}-{hi:.0%}), and every term on which one prompt's samples vary "
            f"(std above {varies}; here {spread_text}) is carried by at least {carried_from:.0%} of pairs. "
            f"This community {html.escape(verdict)}. ")


def _acc(r: dict | None) -> str:
    return "-" if not r else f"{r['pairwise_accuracy']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"


def _gap_range(b: dict) -> str:
    return f"{b['gap_from']:.2f}+" if b["gap_to"] is None else f"{b['gap_from']:.2f}-{b['gap_to']:.2f}"


def learning_section(crit: dict) -> str:
    """The critic's learning curve, its ceiling and its accuracy by oracle gap, for report.html."""
    curve, ceiling = crit.get("learning_curve") or [], crit.get("ceiling")
    if not curve:
        return ""
    rows = "".join(f"<tr><td>{c['fraction']:g}</td><td>{c['n_pairs']}</td>"
                   f"<td>{_acc(c['accuracy_vs_oracle'])}</td></tr>"
                   for c in curve)
    if ceiling:
        rows += (f"<tr><td>ceiling: oracle-ordered pairs of the same feed</td><td>{ceiling['n_pairs']}</td>"
                 f"<td>{_acc(ceiling['accuracy_vs_oracle'])}</td></tr>")
    judges = {"critic": crit["accuracy_vs_oracle"], "zero-shot CLIP": crit["zero_shot_clip_vs_oracle"]}
    if ceiling:
        judges["ceiling"] = ceiling["accuracy_vs_oracle"]
    bins = judges["critic"].get("by_gap") or []
    gap_head = "".join(f"<th>{html.escape(name)}</th>" for name in judges)
    gap_rows = "".join(
        f"<tr><td>{_gap_range(b)}</td><td>{b['n_pairs']}</td>" + "".join(
            "<td>-</td>" if r["by_gap"][i]["accuracy"] is None
            else f"<td>{r['by_gap'][i]['accuracy']:.1%}</td>"
            for r in judges.values()) + "</tr>"
        for i, b in enumerate(bins))
    return ("<h2>What limits the critic</h2><p class='note'>The same recipe on nested random fractions of "
            "the community's pairs (does accuracy still rise with more feedback?) and on the oracle's own "
            "order of the same feed (what clean labels would give). Accuracy against the oracle on the "
            "held-out pairs, 95% intervals.</p><table><tr><th>fraction of the "
            f"pairs</th><th>pairs</th><th>accuracy vs oracle</th></tr>{rows}</table><p class='note'>By how "
            "far apart the oracle puts the two images of a held-out pair (oracle-score units): near ties are "
            "where a critic can only guess.</p><table><tr><th>oracle "
            f"gap</th><th>pairs</th>{gap_head}</tr>{gap_rows}</table>")


def overoptimisation_section(analysis: dict | None) -> str:
    """The over-optimisation chart and where each guard lands against the oracle's peak, for report.html."""
    if not analysis:
        return ""
    peak = analysis["oracle_peak"]
    rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{p['update']}</td><td>{p['oracle']:.3f}</td>"
                   f"<td>{p['from_peak']:+.3f}</td><td>{p['from_base']:+.3f}</td></tr>"
                   for label, p in analysis["picks"].items())
    return ("<h2>Over-optimisation: the hidden taste against the reward</h2><p class='note'>ReFL's "
            "validation prompts at every validation from update 0 (the base). The reward keeps rising; the "
            f"oracle (never seen by training or by any guard) starts at {analysis['oracle_base']:.3f} and "
            f"peaks at update {peak['update']} ({peak['oracle']:.3f}). Each guard sees only the reward, the "
            "zero-shot CLIP and prompt fidelity; the table says where it would select or stop and how far "
            "that is from the peak.</p><img src='overoptimisation.png' "
            "style='max-width:100%'><table><tr><th>guard</th><th>update</th><th>oracle</th><th>from the "
            "peak</th><th>from the base</th></tr>" + rows + "</table>")


def training_section(out: Path) -> str:
    """ReFL's training curve with its held-out judges (refl/training_curve.png), for report.html."""
    if not (out / "refl" / "training_curve.png").is_file():
        return ""
    return ("<h2>ReFL while training</h2><p class='note'>The training reward against updates, and at every "
            "validation the held-out judges (never in the gradient) on validation prompts apart from the "
            "comparison's: a reward that rises while they fall is being hacked. A dashed line marks the "
            "update train.select_by chose, when set.</p><img src='refl/training_curve.png' "
            "style='max-width:100%'>")


def critic_section(summary: dict) -> str:
    """The demo's own numbers, placed at the top of report.html."""
    crit, comm = summary["critic"], summary["community"]["community"]
    rows = [("fine-tuned critic (Social Reward, triplet)", crit["accuracy_vs_oracle"]),
            ("pre-trained toy CLIP, zero-shot", crit["zero_shot_clip_vs_oracle"])]
    table = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{r['pairwise_accuracy']:.1%}</td>"
        f"<td>[{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]</td><td>{r['n_pairs']}</td></tr>" for name, r in rows)
    base_fid = summary.get("base_model", {}).get("eval_prompt_fidelity")
    carried = comm.get("term_agreement")
    carried_text = ("Share of pairs whose preferred image is better on each oracle term (ties half; 50% = no "
                    "signal): " + ", ".join(f"{t} {v:.0%}" for t, v in carried.items())
                    + ". ") if carried else ""
    carried_text += realism_text(comm)
    feed = summary["community"].get("feed")
    feed_text = (" drawn at mixed guidance scales as real feeds mix settings (per scale, mean oracle and "
                 "prompt fidelity: " + "; ".join(f"CFG {g} {v['oracle']:.3f}, {v['prompt_fidelity']:.0%}"
                                          for g, v in feed.items()) + ")") if feed else ""
    cr = crit.get("realism")
    critic_text = (f" Realism criterion on the critic: at least {cr['critic_accuracy_from']:.0%} with its "
                   "interval above the zero-shot CLIP's: "
                   f"{'holds' if cr['realistic'] else 'missed'}.") if cr else ""
    fidelity_text = (f" The shipped toy SD gets shape, colour and background right on {base_fid:.0%} of "
                     "held-out prompts.") if base_fid is not None else ""
    return (
        "<h2>The critic against the hidden taste</h2>"
        f"<p class='note'>The community remixed {comm['n_remixed']} of {comm['n_images']} base-model images "
        f"of {comm['n_prompts']} training prompts{feed_text}, giving {comm['n_pairs']} Social Reward pairs, "
        f"{comm['oracle_agreement']:.1%} of which agree with the oracle (real implicit feedback is noisy). "
        f"{carried_text}Below: pairwise accuracy against the oracle on pairs from held-out prompts, 95% "
        f"bootstrap intervals.{fidelity_text}{critic_text}</p>"
        "<table><tr><th>critic</th><th>accuracy vs oracle</th><th>95% interval</th><th>pairs</th></tr>"
        f"{table}<tr><td>chance</td><td>50.0%</td><td></td><td></td></tr></table>"
    )


def promise_section(p: dict) -> str:
    """The report's opening sentence: whether the promise held on this world, with the numbers."""
    if "refl_minus_base" not in p:
        return ""
    d, b = p["refl_minus_base"], p["best_of_n_minus_base"]
    verdict = "held" if p["held"] else "did not hold"
    return (f"<p><b>The promise {verdict} on this world:</b> ReFL's one sample against the base's on the "
            f"hidden taste (the oracle, per held-out prompt) {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, "
            f"{d['ci95'][1]:+.3f}] (the goal: an interval above 0 with prompt fidelity within 5 points; "
            f"fidelity {100 * p['fidelity_minus_base']:+.1f} points); best-of-{p['best_of_n']} by the "
            f"critic, at {p['best_of_n']}x the sampling, {b['mean']:+.3f} [{b['ci95'][0]:+.3f}, "
            f"{b['ci95'][1]:+.3f}]; the critic orders held-out pairs as the oracle does "
            f"{p['critic_accuracy']:.1%} of the time (zero-shot CLIP {p['zero_shot_accuracy']:.1%}).</p>")
