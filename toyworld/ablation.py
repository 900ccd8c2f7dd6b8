"""ReFL variants on a finished demo, judged against the hidden taste.

Every variant is the demo's resolved config (`demo_config.yaml`) plus its own overrides, trained at the
demo's seed against the demo's critic and judged on its own held-out prompts by the oracle and prompt
fidelity, with the same sampling seeds as the base model (toyworld/variants.py runs them; the variant
without overrides is the demo's own ReFL run), so each difference from base is paired per prompt.
Reported per variant: the change in the critic (what ReFL maximises), in the oracle and in each oracle
term, and in prompt fidelity, with 95% bootstrap intervals over prompts.

The default variants are the regulariser study: no regulariser, the denoising loss on base-model
samples (the demo's setting), on the world's renders (its pre-training data), the KL-to-base penalty,
both, and a control that trains on the regulariser alone (no reward).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from evaluation.arms import arm_name
from toyworld.variants import interval_cell, markdown_table, open_demo, run_variants

DEFAULT_VARIANTS: dict[str, list[str]] = {
    "no regulariser": ["refl.step.reg_weight=0"],
    "denoising on base samples": [],
    "denoising on renders": ["n_reg_renders=512"],
    "KL to base": ["refl.step.reg_weight=0", "refl.step.kl_weight=10"],
    "denoising + KL": ["refl.step.kl_weight=10"],
    "regulariser only (no reward)": ["refl.step.grad_scale=0"],
}


@dataclass
class AblationConfig:
    """What `social-refl-ablation` runs: ReFL variants on a finished demo, judged against the hidden taste."""

    # A finished demo's output folder.
    demo: str = "runs/demo"
    # Variants as "NAME: KEY=VALUE ..." (DemoConfig overrides); [] = the regulariser study (VARIANTS).
    variants: list[str] = field(default_factory=list)
    # Held-out prompts judged on (the comparison's draw, at most 50).
    n_prompts: int = 32
    # Paired base/ReFL samples per prompt.
    n_samples: int = 16


def run_ablation(demo_dir: str | Path, variants: dict[str, list[str]] | None = None, n_prompts: int = 32,
                 n_samples: int = 16) -> dict:
    """Train and judge each variant under `demo_dir/ablation/`; finished variants are reused."""
    from evaluation.stats import mean_ci
    from runkit.files import atomic_write_text, write_json
    from toyworld.demo.analysis import arm_label, oracle_breakdown
    from toyworld.demo.config import compare_config
    from toyworld.world import heldout_prompts

    demo = open_demo(demo_dir)
    variants = DEFAULT_VARIANTS if variants is None else variants
    root = demo.folder / "ablation"
    root.mkdir(exist_ok=True)
    prompts_file = root / "eval_prompts.txt"
    atomic_write_text(prompts_file, "\n".join(heldout_prompts("compare", n_prompts)) + "\n")

    def compare(cfg, lora, folder):
        judged = compare_config(cfg, str(demo.critic), lora, prompts_file, folder,
                                evaluators=["oracle:", "fidelity:"])
        return replace(judged, n_samples=n_samples, batch_size=n_samples, seed=11, tuned_best_of=False)

    runs = run_variants(demo, root, variants, [demo.cfg.refl.train.seed], compare)
    table = {}
    for name, by_seed in runs.items():
        (run,) = by_seed.values()
        results = run.results
        base, tuned = (results["arms"][arm_name(model)]["per_prompt"] for model in ("base", "refl"))
        differences = {spec: mean_ci(np.asarray(tuned[spec]) - np.asarray(base[spec])) for spec in base}
        terms = oracle_breakdown(run.folder, results)["difference_from_base"][arm_label("refl")]
        table[name] = {"overrides": variants[name], "selector": results["selector"],
                       "difference_from_base": differences, "oracle_terms_difference": terms,
                       "train": {k: v for k, v in run.refl.items() if k.startswith("train/")}}
    summary = {"demo": str(demo.folder), "prompts": n_prompts, "samples_per_prompt": n_samples,
               "variants": {}}
    previous = root / "ablation.json"
    if previous.is_file():  # variants judged the same way earlier stay in the table
        old = json.loads(previous.read_text())
        if (old["prompts"], old["samples_per_prompt"]) == (n_prompts, n_samples):
            summary["variants"] = old["variants"]
    summary["variants"].update(table)
    write_json(previous, summary)  # atomic: an interrupted write never loses the earlier variants
    atomic_write_text(root / "ablation.md", ablation_markdown(summary))
    return summary


def ablation_markdown(summary: dict) -> str:
    """One row per variant: ReFL minus base on the critic, the oracle, fidelity and the oracle's largest
    moves."""
    rows = []
    for name, row in summary["variants"].items():
        diff = row["difference_from_base"]
        cells = [interval_cell(diff[key]) for key in (row["selector"], "oracle:", "fidelity:")]
        moves = sorted(row["oracle_terms_difference"].items(), key=lambda kv: -abs(kv[1]["mean"]))[:3]
        rows.append([name, f"`{' '.join(row['overrides']) or '-'}`", *cells,
                     ", ".join(f"{t} {d['mean']:+.3f}" for t, d in moves)])
    lines = [f"ReFL minus base, mean over {summary['prompts']} held-out prompts x "
             f"{summary['samples_per_prompt']} paired samples [95% interval]", "",
             *markdown_table(["variant", "overrides", "critic", "oracle", "prompt fidelity",
                              "largest oracle-term moves"], rows)]
    return "\n".join(lines) + "\n"
