"""The world study: ReFL trained with several seeds on a finished demo, each judged like the demo's own.

One training seed is an anecdote (float differences between CPUs alone moved the demo's ReFL arm), so
the study trains the demo's ReFL config once per seed (`refl.train.seed`), against the demo's critic,
and draws the same held-out prompts with the same sampling seeds. Base and base best-of-N do not
depend on the training seed: they are the demo's own samples, copied once. Reported per judge (the
critic, the zero-shot CLIP, the oracle, prompt fidelity) and per oracle term: base, best-of-N, ReFL
per seed with its per-prompt 95% interval, and the mean and spread (std, min, max) across seeds of
ReFL and of ReFL minus base.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)


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


def run_study(demo_dir: str | Path, seeds=DEFAULT_SEEDS) -> dict:
    """Train and judge ReFL once per seed under `demo_dir/study/`; finished seeds are reused."""
    from evaluation.harness import run_compare
    from runkit.config import load_config, override
    from runkit.files import atomic_write_text, write_json
    from toyworld.demo import DemoConfig, compare_config, oracle_breakdown, stage_refl
    from toyworld.world import split_prompts

    demo_dir = Path(demo_dir)
    config_file, critic = demo_dir / "demo_config.yaml", demo_dir / "critic" / "critic"
    prompts_file = demo_dir / "compare_prompts.txt"
    if not (config_file.is_file() and critic.is_dir() and (demo_dir / "results.json").is_file()):
        raise FileNotFoundError(f"{demo_dir} is not a finished demo (needs demo_config.yaml, critic/critic and "
                                "results.json); run `python scripts/demo.py --out DIR` first")
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    cfg = load_config(DemoConfig, config_file)
    train_prompts = split_prompts(seed=0)[0]
    per_seed = {}
    for seed in seeds:
        seed_cfg = override(cfg, [f"refl.train.seed={int(seed)}"])
        if seed == cfg.refl.train.seed:  # the demo's own run: its LoRA and its comparison
            refl_dir, compare_dir = demo_dir / "refl", demo_dir
        else:
            refl_dir, compare_dir = demo_dir / "study" / f"seed-{seed}" / "refl", demo_dir / "study" / f"seed-{seed}"
            for part in ("samples", "scores"):  # base samples do not depend on the training seed
                if not (compare_dir / part / "base").exists():
                    shutil.copytree(demo_dir / part / "base", compare_dir / part / "base")
        logger.info("study seed %d: ReFL in %s", seed, refl_dir)
        refl = stage_refl(seed_cfg, str(critic), train_prompts, refl_dir)
        if compare_dir == demo_dir:  # judged by the demo already (running the harness there would replace its report)
            results = json.loads((demo_dir / "results.json").read_text())
        else:
            results = run_compare(compare_config(seed_cfg, str(critic), refl["lora"], prompts_file, compare_dir))
        per_seed[int(seed)] = _judge_seed(results, oracle_breakdown(compare_dir, results))
    summary = {"demo": str(demo_dir), "seeds": [int(s) for s in seeds], "selector": str(critic),
               "n_prompts": len(results["prompts"]), "n_samples": results["n_samples"],
               "per_seed": per_seed, "across_seeds": _aggregate(per_seed)}
    write_json(demo_dir / "study" / "study.json", summary)
    atomic_write_text(demo_dir / "study" / "study.md", markdown_table(summary))
    return summary


def _short(spec: str, selector: str) -> str:
    if spec == f"critic:{selector}" or spec.endswith(selector):
        return "critic"
    return {"clip": "zero-shot CLIP", "oracle": "oracle", "fidelity": "prompt fidelity"}.get(spec.split(":")[0], spec)


def markdown_table(summary: dict) -> str:
    """Per judge and oracle term: base, best-of-N, ReFL mean +- std over seeds, ReFL minus base per seed."""
    seeds = summary["seeds"]
    n = summary["n_samples"]
    lines = [f"ReFL with {len(seeds)} training seeds ({', '.join(map(str, seeds))}) on {summary['n_prompts']} "
             f"held-out prompts; base and best-of-{n} are the same samples for every seed. ReFL minus base per "
             "seed: mean over prompts [95% interval].", "",
             f"| judge | base | best-of-{n} | ReFL (mean ± std over seeds) | "
             + " | ".join(f"ReFL - base, seed {s}" for s in seeds) + " |",
             "|---|---|---|---|" + "---|" * len(seeds)]
    for group in ("judges", "terms"):
        for key, agg in summary["across_seeds"][group].items():
            name = _short(key, summary["selector"]) if group == "judges" else f"oracle term: {key}"
            cells = [f"{agg['base']:.3f}", f"{agg['best_of_n']:.3f}",
                     f"{agg['refl']['mean']:.3f} ± {agg['refl']['std']:.3f}"]
            for s in seeds:
                d = summary["per_seed"][s][group][key]["refl_minus_base"]
                cells.append(f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
