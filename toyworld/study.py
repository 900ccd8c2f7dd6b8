"""Studies on a finished demo: ReFL variants, each trained with several seeds and judged like the demo's own.

One training seed is an anecdote (float differences between CPUs alone moved the demo's ReFL arm), so
every variant trains the demo's ReFL config plus its own overrides once per seed (`refl.train.seed`),
and draws the same held-out prompts with the same sampling seeds. Base and base best-of-N do not
depend on the variant or the seed: they are the demo's own samples, copied once. Reported per judge
(the critic, the zero-shot CLIP, the oracle, prompt fidelity) and per oracle term: base, best-of-N,
ReFL per seed with its per-prompt 95% interval, and the mean and spread (std, min, max) across seeds
of ReFL and of ReFL minus base.

Two studies are defined; both keep their runs in <demo>/study/<variant>/seed-N, so the plain ReFL
seeds are trained once for both:
- "world": plain ReFL (the toy world's own result);
- "guard": plain ReFL against the hacking guards (selection by a held-out judge that is not the
  oracle, a critic ensemble with an uncertainty penalty, and both).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

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
        "ReFL + 3-critic ensemble, penalty 1": ["critic_members=3", "refl.reward.ensemble_penalty=1"],
        "ReFL + ensemble + select": ["critic_members=3", "refl.reward.ensemble_penalty=1",
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

    arms = results["arms"]
    best = f"base_best_of_{results['n_samples']}"
    out = {"judges": {}, "terms": {}}
    for spec in results["evaluators"]:
        base = np.asarray(arms["base_random"]["per_prompt"][spec])
        tuned = np.asarray(arms["refl_random"]["per_prompt"][spec])
        out["judges"][spec] = {"base": arms["base_random"]["scores"][spec], "best_of_n": arms[best]["scores"][spec],
                               "refl": arms["refl_random"]["scores"][spec], "refl_minus_base": mean_ci(tuned - base)}
    best_label = next(a for a in breakdown["mean"] if a.startswith("base best-of"))
    for term, diff in breakdown["difference_from_base"]["ReFL"].items():
        out["terms"][term] = {"base": breakdown["mean"]["base"][term],
                              "best_of_n": breakdown["mean"][best_label][term],
                              "refl": breakdown["mean"]["ReFL"][term], "refl_minus_base": diff}
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


def ensemble_members(cfg, demo_members: list[str], pairs: str, out: Path) -> list[str]:
    """`cfg.critic_members` critic directories: the demo's own, then members trained here (seed + k) as the
    demo would have trained them; a finished member is reused while its settings and pairs are unchanged."""
    from runkit.files import write_json
    from toyworld.demo import _trainer_settings, critic_config, enter_stage, train_critic_member

    members = list(demo_members)[: cfg.critic_members]
    for k in range(len(members), cfg.critic_members):
        member_dir = out / f"member-{k}"
        settings = {**_trainer_settings(critic_config(cfg, pairs, member_dir)), "member": k}
        if enter_stage(member_dir, member_dir / "member.json", settings,
                       {"pairs": str(Path(pairs).parent), "clip_model": cfg.clip_model}) is None:
            write_json(member_dir / "member.json", {"critic": train_critic_member(cfg, pairs, member_dir, k)})
        members.append(str(member_dir / "critic"))
    return members


def run_study(demo_dir: str | Path, seeds=DEFAULT_SEEDS, study: str = "world",
              variants: dict[str, list[str]] | None = None) -> dict:
    """Train and judge each variant once per seed under `demo_dir/study/`; finished runs are reused.
    Writes study/<study>.json and study/<study>.md."""
    from evaluation.harness import run_compare
    from runkit.config import load_config, override
    from runkit.files import atomic_write_text, write_json
    from toyworld.ablation import slug
    from toyworld.demo import (
        DemoConfig,
        community_pairs_file,
        compare_config,
        critic_dirs,
        oracle_breakdown,
        stage_refl,
    )
    from toyworld.world import split_prompts

    demo_dir = Path(demo_dir)
    config_file, critic = demo_dir / "demo_config.yaml", demo_dir / "critic" / "critic"
    prompts_file, summary_file = demo_dir / "compare_prompts.txt", demo_dir / "summary.json"
    if not (config_file.is_file() and critic.is_dir() and summary_file.is_file()):
        raise FileNotFoundError(f"{demo_dir} is not a finished demo (needs demo_config.yaml, critic/critic and "
                                "summary.json); run `python scripts/demo.py --out DIR` first")
    if study not in STUDIES and variants is None:
        raise ValueError(f"unknown study {study!r}; studies are {sorted(STUDIES)}")
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    variants = STUDIES[study] if variants is None else variants
    cfg = load_config(DemoConfig, config_file)
    demo = json.loads(summary_file.read_text())
    pairs = str(community_pairs_file(demo_dir))
    demo_members = critic_dirs(demo_dir / "critic", len(demo["critic"].get("members", [None])))
    train_prompts = split_prompts(seed=0)[0]
    root = demo_dir / "study"
    table = {}
    for name, overrides in variants.items():
        resolved = [o.replace("{clip_model}", cfg.clip_model) for o in overrides]  # other braces are YAML
        vcfg = override(cfg, resolved)
        members = ensemble_members(vcfg, demo_members, pairs, root / "critics")
        reward_critic = members if len(members) > 1 else str(critic)
        per_seed = {}
        for seed in seeds:
            seed_cfg = override(vcfg, [f"refl.train.seed={int(seed)}"])
            if not resolved and seed == cfg.refl.train.seed:  # the demo's own run: its LoRA and its comparison
                refl_dir, compare_dir = demo_dir / "refl", demo_dir
            else:
                compare_dir = root / slug(name) / f"seed-{seed}"
                refl_dir = compare_dir / "refl"
                for part in ("samples", "scores"):  # base samples depend on neither the variant nor the seed
                    if not (compare_dir / part / "base").exists():
                        shutil.copytree(demo_dir / part / "base", compare_dir / part / "base")
            logger.info("study %s, %s, seed %d: ReFL in %s", study, name, seed, refl_dir)
            refl = stage_refl(seed_cfg, reward_critic, train_prompts, refl_dir)
            lora = refl["lora_best"] if seed_cfg.refl.train.select_by else refl["lora"]
            if compare_dir == demo_dir:  # judged by the demo already (running the harness there would replace its report)
                results = json.loads((demo_dir / "results.json").read_text())
            else:
                ccfg = compare_config(seed_cfg, str(critic), lora, prompts_file, compare_dir)
                results = run_compare(replace(ccfg, tuned_best_of=False))  # only ReFL's random samples are read
            per_seed[int(seed)] = _judge_seed(results, oracle_breakdown(compare_dir, results))
            if seed_cfg.refl.train.select_by:
                per_seed[int(seed)]["selected_update"] = refl.get("best_update")
        table[name] = {"overrides": resolved, "per_seed": per_seed, "across_seeds": _aggregate(per_seed)}
    summary = {"demo": str(demo_dir), "study": study, "seeds": [int(s) for s in seeds], "selector": str(critic),
               "n_prompts": len(results["prompts"]), "n_samples": results["n_samples"], "variants": table}
    write_json(root / f"{study}.json", summary)
    atomic_write_text(root / f"{study}.md", markdown_table(summary))
    return summary


def _short(spec: str, selector: str) -> str:
    if spec == f"critic:{selector}" or spec.endswith(selector):
        return "critic"
    return {"clip": "zero-shot CLIP", "oracle": "oracle", "fidelity": "prompt fidelity"}.get(spec.split(":")[0], spec)


def _cell(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def variant_table(summary: dict, row: dict) -> list[str]:
    """Per judge and oracle term: base, best-of-N, ReFL mean +- std over seeds, ReFL minus base per seed."""
    seeds, n = summary["seeds"], summary["n_samples"]
    lines = [f"| judge | base | best-of-{n} | ReFL (mean ± std over seeds) | "
             + " | ".join(f"ReFL - base, seed {s}" for s in seeds) + " |",
             "|---|---|---|---|" + "---|" * len(seeds)]
    for group in ("judges", "terms"):
        for key, agg in row["across_seeds"][group].items():
            name = _short(key, summary["selector"]) if group == "judges" else f"oracle term: {key}"
            cells = [f"{agg['base']:.3f}", f"{agg['best_of_n']:.3f}",
                     f"{agg['refl']['mean']:.3f} ± {agg['refl']['std']:.3f}"]
            cells += [_cell(row["per_seed"][s][group][key]["refl_minus_base"]) for s in seeds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def overview_table(summary: dict) -> list[str]:
    """One row per variant: ReFL minus base per judge as mean ± std over seeds, and how many seeds have a
    per-prompt interval above / below 0."""
    first = next(iter(summary["variants"].values()))["across_seeds"]["judges"]
    judges = list(first)
    n = summary["n_samples"]
    lines = ["| variant | " + " | ".join(_short(j, summary["selector"]) for j in judges) + " |",
             "|---|" + "---|" * len(judges),
             "| base (score) | " + " | ".join(f"{first[j]['base']:.3f}" for j in judges) + " |",
             f"| best-of-{n} - base | " + " | ".join(f"{first[j]['best_of_n'] - first[j]['base']:+.3f}"
                                                     for j in judges) + " |"]
    for name, row in summary["variants"].items():
        cells = []
        for j in judges:
            agg = row["across_seeds"]["judges"][j]
            d = agg["refl_minus_base"]
            cells.append(f"{d['mean']:+.3f} ± {d['std']:.3f} ({agg['seeds_above_zero']}↑ {agg['seeds_below_zero']}↓)")
        lines.append(f"| {name} - base | " + " | ".join(cells) + " |")
    return lines


def markdown_table(summary: dict) -> str:
    """The study as markdown: an overview of the variants (when there are several), then each variant's table."""
    seeds = summary["seeds"]
    lines = [f"ReFL with {len(seeds)} training seeds ({', '.join(map(str, seeds))}) on {summary['n_prompts']} "
             f"held-out prompts; base and best-of-{summary['n_samples']} are the same samples for every variant "
             "and seed. ReFL minus base per seed: mean over prompts [95% interval].", ""]
    if len(summary["variants"]) > 1:
        lines += ["ReFL minus base, mean ± std over seeds (seeds whose per-prompt 95% interval is above / below 0):",
                  "", *overview_table(summary), ""]
    for name, row in summary["variants"].items():
        if len(summary["variants"]) > 1:
            lines += [f"### {name}" + (f" (`{' '.join(row['overrides'])}`)" if row["overrides"] else ""), ""]
        lines += variant_table(summary, row) + [""]
    return "\n".join(lines)
