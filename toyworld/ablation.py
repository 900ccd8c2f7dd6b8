"""ReFL variants on a finished demo, judged against the hidden taste.

Every variant starts from the demo's resolved config (`demo_config.yaml`) plus its own overrides,
trains its own LoRA against the demo's critic, and samples the same held-out prompts with the same
seeds as the base model, so each difference from base is paired per prompt. Reported per variant:
the change in the critic (what ReFL maximises), in the oracle and in each oracle term, and in
prompt fidelity, with 95% bootstrap intervals over prompts.

The default variants are the regulariser study: no regulariser, the denoising loss on base-model
samples (the demo's setting), on the world's renders (its pre-training data), the KL-to-base penalty,
both, and a control that trains on the regulariser alone (no reward).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_VARIANTS: dict[str, list[str]] = {
    "no regulariser": ["refl.refl.reg_weight=0"],
    "denoising on base samples": [],
    "denoising on renders": ["reg_renders=512"],
    "KL to base": ["refl.refl.reg_weight=0", "refl.refl.kl_weight=10"],
    "denoising + KL": ["refl.refl.kl_weight=10"],
    "regulariser only (no reward)": ["refl.refl.grad_scale=0"],
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name: key=value key=value' -> (name, overrides)."""
    name, sep, rest = spec.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"variant {spec!r} must look like 'name: key=value key=value'")
    return name.strip(), rest.split()


def run_ablation(demo_dir: str | Path, variants: dict[str, list[str]] | None = None, n_prompts: int = 32,
                 n_samples: int = 16) -> dict:
    """Train and judge each variant under `demo_dir/ablation/`; finished variants are reused."""
    from evaluation.harness import run_compare
    from evaluation.stats import mean_ci
    from runkit.config import load_config
    from runkit.files import atomic_write_text, write_json
    from toyworld.demo import DemoConfig, compare_config, oracle_breakdown, stage_refl
    from toyworld.world import split_prompts

    demo_dir = Path(demo_dir)
    config_file = demo_dir / "demo_config.yaml"
    critic = demo_dir / "critic" / "critic"
    if not config_file.is_file() or not critic.is_dir():
        raise FileNotFoundError(f"{demo_dir} is not a finished demo (needs demo_config.yaml and critic/critic); "
                                "run `python scripts/demo.py --out DIR` first")
    variants = DEFAULT_VARIANTS if variants is None else variants
    root = demo_dir / "ablation"
    root.mkdir(exist_ok=True)
    train_prompts, held = split_prompts(seed=0)
    prompts_file = root / "eval_prompts.txt"
    atomic_write_text(prompts_file, "\n".join(held[:n_prompts]) + "\n")
    shared_base = None
    table = {}
    for name, overrides in variants.items():
        out = root / slug(name)
        cfg = load_config(DemoConfig, config_file, overrides)
        logger.info("variant %r: %s", name, " ".join(overrides) or "(the demo's settings)")
        refl = stage_refl(cfg, str(critic), train_prompts, out / "refl")
        compare_dir = out / "compare"
        if shared_base is not None and not (compare_dir / "samples" / "base").exists():
            for part in ("samples", "scores"):  # the base arm is the same for every variant: draw it once
                shutil.copytree(shared_base / part / "base", compare_dir / part / "base")
        ccfg = replace(compare_config(cfg, str(critic), refl["lora"], prompts_file, compare_dir,
                                      evaluators=["oracle:", "fidelity:"]),
                       n_samples=n_samples, batch_size=n_samples, seed=11, tuned_best_of=False)
        results = run_compare(ccfg)
        shared_base = shared_base or compare_dir
        base, tuned = results["arms"]["base_random"]["per_prompt"], results["arms"]["refl_random"]["per_prompt"]
        differences = {spec: mean_ci(np.asarray(tuned[spec]) - np.asarray(base[spec])) for spec in base}
        terms = oracle_breakdown(compare_dir, results)["difference_from_base"]["ReFL"]
        table[name] = {"overrides": overrides, "selector": results["selector"], "difference_from_base": differences,
                       "oracle_terms_difference": terms, "train": {k: v for k, v in refl.items()
                                                                   if k.startswith("train/")}}
    summary = {"demo": str(demo_dir), "prompts": n_prompts, "samples_per_prompt": n_samples, "variants": {}}
    previous = root / "ablation.json"
    if previous.is_file():  # variants judged the same way earlier stay in the table
        old = json.loads(previous.read_text())
        if (old["prompts"], old["samples_per_prompt"]) == (n_prompts, n_samples):
            summary["variants"] = old["variants"]
    summary["variants"].update(table)
    write_json(previous, summary)  # atomic: an interrupted write never loses the earlier variants
    atomic_write_text(root / "ablation.md", markdown_table(summary))
    return summary


def markdown_table(summary: dict) -> str:
    """One row per variant: ReFL minus base on the critic, the oracle, fidelity and the oracle's largest moves."""
    lines = [f"ReFL minus base, mean over {summary['prompts']} held-out prompts x {summary['samples_per_prompt']} "
             "paired samples [95% interval]", "",
             "| variant | overrides | critic | oracle | prompt fidelity | largest oracle-term moves |",
             "|---|---|---|---|---|---|"]
    for name, row in summary["variants"].items():
        diff = row["difference_from_base"]
        cells = []
        for key in (row["selector"], "oracle:", "fidelity:"):
            d = diff[key]
            cells.append(f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
        moves = sorted(row["oracle_terms_difference"].items(), key=lambda kv: -abs(kv[1]["mean"]))[:3]
        lines.append(f"| {name} | `{' '.join(row['overrides']) or '-'}` | " + " | ".join(cells)
                     + " | " + ", ".join(f"{t} {d['mean']:+.3f}" for t, d in moves) + " |")
    return "\n".join(lines) + "\n"
