"""The toy world's ReFL settings, chosen by refl.sweep's rule from a small sweep on a demo's critic.

The grid, the rule and its thresholds were written down (and committed) before the sweep ran; docs/results.md
names that commit. Each setting trains the demo's ReFL config plus its overrides, validating every 10 updates
from update 0 on the demo's validation prompts (never the comparison's), against the demo's critic. The rule
sees the reward and the judges a user has (the zero-shot CLIP, prompt fidelity); the oracle is logged beside
them in each run's metrics.jsonl, for evaluation after the choice, and the rule refuses it.

Runs live in <demo>/sweep/<setting>/refl/ and are reused while their settings and inputs are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from evaluation.report import short_name
from refl.sweep import HELDOUT, SweepRule, choose, validations
from runkit.config import override
from runkit.files import atomic_write_text, write_json
from runkit.logs import read_metrics
from toyworld.evaluators import JUDGE_LABELS
from toyworld.rule import rule_for
from toyworld.variants import markdown_table, slug

logger = logging.getLogger(__name__)

# Every run: the demo's budget (120 updates), validated from update 0 every 10 updates.
COMMON = ["refl.train.max_updates=120", "refl.train.validate_every=10", "refl.train.validate_at_start=true"]
# Learning rates around peers' LoRA rates (1e-4 to 1e-3) up to the second edition's 3e-3; guidance in training
# as the demo samples (4) or none (1, as ImageReward's ReFL rollouts).
GRID = {f"lr {lr}, training CFG {g:g}": [f"refl.train.lr={lr}", f"refl.step.guidance_scale={g}"]
        for g in (4.0, 1.0) for lr in ("3e-4", "1e-3", "3e-3")}


@dataclass
class SweepConfig:
    """What `social-refl-refl-sweep` runs: the grid of ReFL settings on a demo's critic, chosen by the
    rule."""

    # A demo output folder with a trained critic (`social-refl-demo --until critic` is enough).
    demo: str = "runs/demo"


def run_sweep(demo_dir: str | Path, grid: dict[str, list[str]] | None = None) -> dict:
    """Train every setting of `grid` (default GRID) on the demo's critic, apply the rule; writes
    <demo>/sweep/sweep.json and sweep.md. Needs the demo's community and critic stages only."""
    from runkit.config import load_config
    from toyworld.demo.config import DemoConfig, refl_config
    from toyworld.demo.stages import stage_refl
    from toyworld.world import split_prompts

    demo = Path(demo_dir)
    critic = demo / "critic" / "critic"
    if not ((demo / "demo_config.yaml").is_file() and critic.is_dir()):
        raise FileNotFoundError(f"{demo} has no trained critic (needs demo_config.yaml and critic/critic); "
                                "run `social-refl-demo --out DIR --until critic` first")
    base = load_config(DemoConfig, demo / "demo_config.yaml")
    rule = rule_for(base.clip_model)
    rule.check()
    grid = GRID if grid is None else grid
    # all checked first
    configs = {name: override(base, COMMON + overrides) for name, overrides in grid.items()}
    # The rule's judges must be validated in every run, or the rule fails after all the training.
    for name, cfg in configs.items():
        judges = refl_config(cfg, str(critic), demo, demo, None).train.heldout_evaluators
        missing = [k.removeprefix(HELDOUT) for k in rule.hold if k.removeprefix(HELDOUT) not in judges]
        if missing:
            raise ValueError(f"sweep setting {name!r}: the rule holds {missing}, which "
                             f"refl.train.heldout_evaluators ({judges}) does not validate; add them to the "
                             "demo's refl.train.heldout_evaluators")
    root = demo / "sweep"
    runs = {}
    for name, cfg in configs.items():
        folder = root / slug(name) / "refl"
        logger.info("sweep: %s in %s", name, folder)
        stage_refl(cfg, str(critic), split_prompts(seed=0)[0], folder)
        runs[name] = read_metrics(folder / "metrics.jsonl")
    choice = choose(runs, rule)
    result = {"rule": {"maximise": rule.maximise, "hold": rule.hold}, "grid": grid, "common": COMMON,
              "choice": {"setting": choice["run"], "overrides": grid[choice["run"]],
                         "update": choice["update"]},
              "per_run": choice["per_run"],
              "curves": {name: _user_view(validations(r), rule) for name, r in runs.items()}}
    result["evaluation"] = _evaluate_after_choice(runs, base.clip_model, root)
    write_json(root / "sweep.json", result)
    atomic_write_text(root / "sweep.md", sweep_markdown(result) + "\n")
    return result


def _evaluate_after_choice(runs: dict[str, list[dict]], clip_model: str, root: Path) -> dict:
    """After the choice, the oracle on each run's validation curve (toyworld/overoptimisation.py): its peak
    and where the rule and each guard land; the chosen setting's chart in overoptimisation.png. Evaluation
    only."""
    from toyworld.overoptimisation import analyse, plot

    out = {}
    for name, records in runs.items():
        analysis = analyse(records, clip_model)
        if analysis is not None:
            out[name] = analysis
            plot(records, analysis, clip_model, root / slug(name) / "overoptimisation.png")
    return out


def _user_view(rows: list[dict], rule: SweepRule) -> list[dict]:
    """A run's validation rows with only what the rule may see (no oracle)."""
    keys = ["update", rule.maximise, *rule.hold]
    return [{k: r[k] for k in keys} for r in rows]


def sweep_markdown(result: dict) -> str:
    """The sweep as a table: per setting, the base and the best admissible update with what the rule saw."""
    rule = result["rule"]
    held = list(rule["hold"])
    header = ["setting", "best admissible update", "reward (update 0 -> it)"] + [
        f"{short_name(k.removeprefix(HELDOUT), JUDGE_LABELS)} (update 0 -> it; may drop {v:g})"
        for k, v in rule["hold"].items()]
    rows = []
    for name, curve in result["curves"].items():
        base, top = curve[0], result["per_run"][name]
        if top is None:
            rows.append([name, "none"] + ["-"] * (1 + len(held)))
            continue
        rows.append([name, str(top["update"]), f"{base[rule['maximise']]:.3f} -> {top[rule['maximise']]:.3f}"]
                    + [f"{base[k]:.3f} -> {top[k]:.3f}" for k in held])
    c = result["choice"]
    lines = [f"Rule: maximise {rule['maximise']} over (setting, update) with each held judge within its drop "
             "of update 0.", "", *markdown_table(header, rows), "",
             f"Chosen: {c['setting']} ({' '.join(c['overrides'])}), update {c['update']}."]
    evaluation = result.get("evaluation") or {}
    if evaluation:
        eval_rows = [[name, f"{a['oracle_base']:.3f}",
                      f"{a['oracle_peak']['oracle']:.3f} (update {a['oracle_peak']['update']})",
                      f"{a['picks']['sweep rule']['oracle']:.3f} (update "
                      f"{a['picks']['sweep rule']['update']})",
                      f"{a['picks']['no guard (last update)']['oracle']:.3f}"]
                     for name, a in evaluation.items()]
        lines += ["", "After the choice, evaluation only: the oracle on each setting's validation curve.", "",
                  *markdown_table(["setting", "oracle at update 0", "oracle's peak", "at the rule's pick",
                                   "at the last update"], eval_rows)]
    return "\n".join(lines)
