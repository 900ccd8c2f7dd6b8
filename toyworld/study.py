"""Studies on a finished demo: ReFL variants, each trained with several seeds and judged like the demo's own.

One training seed is an anecdote (float differences between CPUs alone moved the demo's ReFL arm), so
every variant trains the demo's ReFL config plus its own overrides once per seed (`refl.train.seed`),
and draws the same held-out prompts with the same sampling seeds. Base and base best-of-N do not
depend on the variant or the seed: they are the demo's own samples, copied once. Reported per judge
(the critic, the zero-shot CLIP, the oracle, prompt fidelity) and per oracle term: base, best-of-N,
ReFL per seed with its per-prompt 95% interval, and the mean and spread (std, min, max) across seeds
of ReFL and of ReFL minus base.

Two studies are defined; both keep their runs in <demo>/study/<variant>/seed-N (toyworld/variants.py
runs them), so the plain ReFL seeds are trained once for both:
- "world": plain ReFL (the toy world's own result);
- "guard": plain ReFL against the hacking guards (selection by a held-out judge that is not the
  oracle, a critic ensemble with an uncertainty penalty, and both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation.arms import arm_name
from evaluation.report import short_name
from runkit.logs import read_metrics
from toyworld.demo.analysis import arm_label, oracle_breakdown
from toyworld.evaluators import JUDGE_LABELS
from toyworld.overoptimisation import analyse
from toyworld.variants import interval_cell, markdown_table, open_demo, run_variants

DEFAULT_SEEDS = (0, 1, 2)
PLAIN = "ReFL"
# Variants are demo-config overrides; "{clip_model}" is filled with the demo's zero-shot CLIP.
# The guards and their settings were fixed before any of them was measured on the second-edition world:
# selection by the zero-shot CLIP (a judge the critic was not trained from, and not the oracle), a 3-member
# ensemble of critics trained with different seeds with penalty 1 (mean - 1 x std, Coste et al. 2024),
# and both together.
STUDIES: dict[str, dict[str, list[str]]] = {
    "world": {PLAIN: []},
    "guard": {
        PLAIN: [],
        "ReFL + select by zero-shot CLIP": ["refl.train.select_by=clip:{clip_model}"],
        "ReFL + 3-critic ensemble, penalty 1": ["n_critic_members=3", "refl.reward.ensemble_penalty=1"],
        "ReFL + ensemble + select": ["n_critic_members=3", "refl.reward.ensemble_penalty=1",
                                     "refl.train.select_by=clip:{clip_model}"],
    },
}


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "per_seed": v.tolist()}


def _mean(entry) -> float:
    """A judge's entry is the harness's {mean, ci95}; an oracle term's is its mean."""
    return entry["mean"] if isinstance(entry, dict) else entry


def _judge_seed(results: dict, breakdown: dict) -> dict:
    """One seed's numbers: per judge and per oracle term, the arms' means and ReFL minus base per prompt."""
    from evaluation.stats import mean_ci

    n, arms = results["n_samples"], results["arms"]
    base, best, refl = arms[arm_name("base")], arms[arm_name("base", n)], arms[arm_name("refl")]
    out = {"judges": {}, "terms": {}}
    for spec in results["evaluators"]:
        difference = np.asarray(refl["per_prompt"][spec]) - np.asarray(base["per_prompt"][spec])
        out["judges"][spec] = {"base": base["scores"][spec], "best_of_n": best["scores"][spec],
                               "refl": refl["scores"][spec], "refl_minus_base": mean_ci(difference)}
    labels = arm_label("base"), arm_label("base", n), arm_label("refl")
    for term, diff in breakdown["difference_from_base"][labels[2]].items():
        base_term, best_term, refl_term = (breakdown["mean"][label][term] for label in labels)
        out["terms"][term] = {"base": base_term, "best_of_n": best_term, "refl": refl_term,
                              "refl_minus_base": diff}
    return out


def _aggregate(per_seed: dict[int, dict]) -> dict:
    """Across seeds, per judge and per term: the spread of ReFL's mean and of ReFL minus base, and how many
    seeds have ReFL minus base with a per-prompt interval above 0."""
    first = next(iter(per_seed.values()))
    out = {}
    for group in ("judges", "terms"):
        out[group] = {}
        for key, row in first[group].items():
            rows = [s[group][key] for s in per_seed.values()]
            out[group][key] = {
                "base": _mean(row["base"]),
                "best_of_n": _mean(row["best_of_n"]),
                "refl": _spread([_mean(r["refl"]) for r in rows]),
                "refl_minus_base": _spread([r["refl_minus_base"]["mean"] for r in rows]),
                "seeds_above_zero": sum(r["refl_minus_base"]["ci95"][0] > 0 for r in rows),
                "seeds_below_zero": sum(r["refl_minus_base"]["ci95"][1] < 0 for r in rows),
            }
    return out


@dataclass
class StudyConfig:
    """What `social-refl-world-study` runs on a finished demo."""

    # A finished demo's output folder.
    demo: str = "runs/demo"
    # world: plain ReFL; guard: plain ReFL against selection, an ensemble, and both; critic: the critic recipe
    # on 1/8 to all of the pairs, checkpoints measured against the oracle (toyworld/critic_study.py; no ReFL).
    study: str = "world"
    # Training seeds (ReFL's, or the critic's for study=critic).
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))

    def __post_init__(self):
        if self.study not in (*STUDIES, "critic"):
            raise ValueError(f"study={self.study!r}; choose one of {', '.join(sorted([*STUDIES, 'critic']))}")


def run_study(demo_dir: str | Path, seeds=DEFAULT_SEEDS, study: str = "world",
              variants: dict[str, list[str]] | None = None) -> dict:
    """Train and judge each variant once per seed under `demo_dir/study/`; finished runs are reused.
    Writes study/<study>.json and study/<study>.md."""
    from runkit.files import atomic_write_text, write_json

    demo = open_demo(demo_dir)
    if study not in STUDIES and variants is None:
        raise ValueError(f"unknown study {study!r}; studies are {sorted(STUDIES)}")
    variants = STUDIES[study] if variants is None else variants
    root = demo.folder / "study"
    runs = run_variants(demo, root, variants, seeds)
    table = {}
    for name, by_seed in runs.items():
        per_seed = {}
        for seed, run in by_seed.items():
            per_seed[seed] = _judge_seed(run.results, oracle_breakdown(run.folder, run.results))
            if run.cfg.refl.train.select_by:
                per_seed[seed]["selected_update"] = run.refl.get("best_update")
            over = analyse(read_metrics(Path(run.refl["output_dir"]) / "metrics.jsonl"), demo.cfg.clip_model)
            if over is not None:
                per_seed[seed]["overoptimisation"] = over
        overrides = [o.replace("{clip_model}", demo.cfg.clip_model) for o in variants[name]]
        table[name] = {"overrides": overrides, "per_seed": per_seed, "across_seeds": _aggregate(per_seed)}
    results = next(iter(next(iter(runs.values())).values())).results
    summary = {"demo": str(demo.folder), "study": study, "seeds": [int(s) for s in seeds],
               "selector": str(demo.critic), "n_prompts": len(results["prompts"]),
               "n_samples": results["n_samples"], "variants": table}
    write_json(root / f"{study}.json", summary)
    atomic_write_text(root / f"{study}.md", study_markdown(summary))
    return summary


def _judge(spec: str, selector: str) -> str:
    """A judge's name in the tables: "critic" for the selector, the toy world's names for its judges."""
    return short_name(spec, {f"critic:{selector}": "critic", **JUDGE_LABELS})


def variant_table(summary: dict, row: dict) -> list[str]:
    """Per judge and oracle term: base, best-of-N, ReFL mean +- std over seeds, ReFL minus base per seed."""
    seeds, n = summary["seeds"], summary["n_samples"]
    rows = []
    for group in ("judges", "terms"):
        for key, agg in row["across_seeds"][group].items():
            name = _judge(key, summary["selector"]) if group == "judges" else f"oracle term: {key}"
            cells = [name, f"{agg['base']:.3f}", f"{agg['best_of_n']:.3f}",
                     f"{agg['refl']['mean']:.3f} ± {agg['refl']['std']:.3f}"]
            rows.append(cells + [interval_cell(row["per_seed"][s][group][key]["refl_minus_base"])
                                 for s in seeds])
    header = ["judge", "base", f"best-of-{n}", "ReFL (mean ± std over seeds)",
              *(f"ReFL - base, seed {s}" for s in seeds)]
    return markdown_table(header, rows)


def overview_table(summary: dict) -> list[str]:
    """One row per variant: ReFL minus base per judge as mean ± std over seeds, and how many seeds have a
    per-prompt interval above / below 0."""
    first = next(iter(summary["variants"].values()))["across_seeds"]["judges"]
    judges = list(first)
    rows = [["base (score)", *(f"{first[j]['base']:.3f}" for j in judges)],
            [f"best-of-{summary['n_samples']} - base", *(f"{first[j]['best_of_n'] - first[j]['base']:+.3f}"
                                                          for j in judges)]]
    for name, row in summary["variants"].items():
        cells = [f"{name} - base"]
        for j in judges:
            agg = row["across_seeds"]["judges"][j]
            d = agg["refl_minus_base"]
            cells.append(f"{d['mean']:+.3f} ± {d['std']:.3f} ({agg['seeds_above_zero']}↑ "
                         f"{agg['seeds_below_zero']}↓)")
        rows.append(cells)
    return markdown_table(["variant", *(_judge(j, summary["selector"]) for j in judges)], rows)


def guard_landing_table(summary: dict) -> list[str]:
    """Per guard, on each variant's validation curves: the update it picks and its oracle minus the oracle's
    peak, per seed (the guards read the run's own curve; only the study's evaluation sees the oracle)."""
    seeds = summary["seeds"]
    rows = []
    for name, row in summary["variants"].items():
        curves = {s: row["per_seed"][s].get("overoptimisation") for s in seeds}
        if not all(curves.values()):
            continue
        rows.append([f"{name}: oracle peak"] + [f"update {c['oracle_peak']['update']}: "
                                                f"{c['oracle_peak']['oracle']:.3f} "
                                               f"({c['oracle_peak']['oracle'] - c['oracle_base']:+.3f} from "
                                               "base)"
                                               for c in curves.values()])
        for label in curves[seeds[0]]["picks"]:
            rows.append([f"{name}: {label}"] + [f"update {c['picks'][label]['update']}: "
                                                f"{c['picks'][label]['from_peak']:+.3f} from peak"
                                                for c in curves.values()])
    if not rows:
        return []
    return ["Where each guard lands on the validation curves (validation prompts, from update 0), per seed:",
            "", *markdown_table(["curve and guard", *(f"seed {s}" for s in seeds)], rows), ""]


def study_markdown(summary: dict) -> str:
    """The study as markdown: an overview of the variants (when there are several), then each variant's
    table."""
    seeds = summary["seeds"]
    lines = [f"ReFL with {len(seeds)} training seeds ({', '.join(map(str, seeds))}) on "
             f"{summary['n_prompts']} held-out prompts; base and best-of-{summary['n_samples']} are the same "
             "samples for every variant and seed. ReFL minus base per seed: mean over prompts [95% "
             "interval].", ""]
    if len(summary["variants"]) > 1:
        lines += ["ReFL minus base, mean ± std over seeds (seeds whose per-prompt 95% interval is above / "
                  "below 0):",
                  "", *overview_table(summary), ""]
    for name, row in summary["variants"].items():
        if len(summary["variants"]) > 1:
            lines += [f"### {name}" + (f" (`{' '.join(row['overrides'])}`)" if row["overrides"] else ""), ""]
        lines += variant_table(summary, row) + [""]
    lines += guard_landing_table(summary)
    return "\n".join(lines)
