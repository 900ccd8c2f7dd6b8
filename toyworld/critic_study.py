"""The demo critic's learning curve over training seeds, and how long each critic trains.

Written when the third edition's critic stage measured its critic at 70.8 / 71.5 / 73.8 / 65.0% against the
oracle on 1/8, 1/4, 1/2 and all of the community's pairs, one training seed per point, on an alphabetical
slice of the held-out prompts. On a random draw of them (toyworld.world.heldout_prompts) the curve rises
with the pairs, and this study shows it does for every seed (docs/results.md). Two explanations fitted the
dip:
- seed noise: one critic per point, and the intervals overlap;
- training length: the recipe trains for a fixed number of epochs, so a critic on 1/8 of the pairs makes 1/8
  of the full critic's updates, and the full critic (whose community validation fell over its epochs) may be
  past its best, fitting the community's noise.

The study, fixed before it was run (its commit is in docs/results.md, "Provenance"): for each fraction of
`FRACTIONS` and each seed of `seeds`, the demo's critic recipe on a random subset of the pairs (seed k draws
the subset and trains with critic.train.seed + k, so seed 0 is the demo's own curve), with a checkpoint and a
community validation every `every` updates (all checkpoints kept). Every checkpoint is measured against the
oracle on the demo's held-out pairs. Reported:
- per fraction, the final critic's accuracy over seeds (mean, min, max), which settles seed noise;
- for every critic, its accuracy against the oracle at each update beside its community validation
  accuracy, which shows whether accuracy falls with training, and at which update;
- the rule a user could follow, the checkpoint with the best community validation accuracy (the earliest
  on a tie), and its accuracy against the oracle next to the final checkpoint's.
The oracle only measures; nothing here is chosen by it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from runkit.files import write_json
from toyworld.demo.layout import community_pairs_file, oracle_pairs_file
from toyworld.variants import markdown_table, open_demo

logger = logging.getLogger(__name__)

FRACTIONS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
EVERY = 10  # updates between checkpoints and community validations (the 1/8 critic makes ~36 in all)


def _critic_run(demo, pairs: Path, seed: int, every: int, out: Path, truth, gaps) -> dict:
    """The demo's critic recipe on `pairs` with seed + `seed`, checkpoints and community validation every
    `every` updates (all kept), each checkpoint measured against the oracle. Reused while its settings and
    input files are unchanged (an interrupted run resumes its checkpoints)."""
    from reward.train import train
    from toyworld.demo.config import critic_config
    from toyworld.demo.stages import enter_stage, finish_stage, trainer_settings

    exp = critic_config(demo.cfg, pairs, out)
    # Every checkpoint is measured here, so the trainer keeps the last (keep_best off): "kept by community
    # validation" below is the same rule, at this study's granularity.
    exp = replace(exp, train=replace(exp.train, seed=exp.train.seed + seed, validate_every=every,
                                     checkpoint_every=every, checkpoints_keep=0, resume="latest",
                                     log_with="none", keep_best=False))
    finished = out / "run.json"
    done = enter_stage(out, finished, trainer_settings(exp),
                       {"pairs": str(pairs), "oracle_pairs": str(oracle_pairs_file(demo.folder)),
                        "clip_model": demo.cfg.clip_model})
    if done is not None:
        return done
    metrics = train(exp)
    curve = _checkpoint_curve(out, metrics["history"], truth, gaps)
    return finish_stage(finished, {"n_pairs": len(pd.read_parquet(pairs)), "updates": metrics["update"],
                                   "curve": curve})


def _checkpoint_curve(out: Path, history: list[dict], truth, gaps) -> list[dict]:
    """Accuracy against the oracle of every checkpoint's critic, beside the community validation at it."""
    import reward
    from runkit.checkpoints import checkpoint_dirs
    from toyworld.critic_vs_oracle import accuracy_vs_oracle

    community = {h["update"]: h["pairwise_accuracy"] for h in history}
    rows = []
    for ckpt in checkpoint_dirs(out):
        update = int(ckpt.name.split("-")[1])
        report = accuracy_vs_oracle(reward.load(ckpt / "critic"), truth, gaps)
        rows.append({"update": update, "oracle_accuracy": report["pairwise_accuracy"],
                     "ci95": report["ci95"], "community_validation": community.get(update)})
    return rows


def _by_community_validation(curve: list[dict]) -> dict:
    """The checkpoint a user would keep: best community validation accuracy, earliest on a tie."""
    scored = [r for r in curve if r["community_validation"] is not None]
    best = max(scored, key=lambda r: (r["community_validation"], -r["update"]))
    return {"update": best["update"], "oracle_accuracy": best["oracle_accuracy"],
            "community_validation": best["community_validation"]}


def run_critic_study(demo_dir: str | Path, seeds=DEFAULT_SEEDS, fractions=FRACTIONS,
                     every: int = EVERY) -> dict:
    """Train and measure every (fraction, seed) critic under <demo>/study/critic/; writes critic.json and
    critic.md there and returns the summary."""
    from reward.data import load_pairs
    from toyworld.critic_vs_oracle import pair_gaps, subset_pairs

    demo = open_demo(demo_dir)
    root = demo.folder / "study" / "critic"
    pairs = community_pairs_file(demo.folder)
    truth = load_pairs(oracle_pairs_file(demo.folder))
    gaps = pair_gaps(truth)  # (N,)
    runs = []
    for fraction in fractions:
        for seed in seeds:
            out = root / f"fraction-{fraction:g}" / f"seed-{seed}"
            part = pairs if fraction >= 1.0 else subset_pairs(
                pairs, fraction, demo.cfg.critic.train.seed + seed, out.parent / f"pairs-seed-{seed}.parquet")
            logger.info("critic study: fraction %g, seed %d", fraction, seed)
            run = _critic_run(demo, part, seed, every, out, truth, gaps)
            curve = run["curve"]
            runs.append({"fraction": fraction, "seed": seed, "n_pairs": run["n_pairs"],
                         "updates": run["updates"], "final": curve[-1], "curve": curve,
                         "best_oracle": max(curve, key=lambda r: r["oracle_accuracy"]),
                         "by_community_validation": _by_community_validation(curve)})
    summary = {"demo": str(demo.folder), "seeds": list(seeds), "every": every,
               "held_out_pairs": len(truth), "runs": runs, "fractions": _per_fraction(runs, fractions)}
    write_json(root / "critic.json", summary)
    (root / "critic.md").write_text(critic_study_markdown(summary))
    return summary


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "per_seed": v.tolist()}


def _per_fraction(runs: list[dict], fractions) -> list[dict]:
    rows = []
    for fraction in fractions:
        mine = [r for r in runs if r["fraction"] == fraction]
        rows.append({"fraction": fraction, "n_pairs": mine[0]["n_pairs"], "updates": mine[0]["updates"],
                     "final": _spread([r["final"]["oracle_accuracy"] for r in mine]),
                     "by_community_validation": _spread(
                         [r["by_community_validation"]["oracle_accuracy"] for r in mine]),
                     "best_oracle": _spread([r["best_oracle"]["oracle_accuracy"] for r in mine]),
                     "best_oracle_update": [r["best_oracle"]["update"] for r in mine]})
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def critic_study_markdown(summary: dict) -> str:
    def spread(d: dict) -> str:
        return f"{_pct(d['mean'])} ({_pct(d['min'])}-{_pct(d['max'])})"

    lines = ["# The critic's learning curve over seeds", "",
             f"Demo {summary['demo']}; seeds {summary['seeds']}; a checkpoint and a community validation "
             f"every {summary['every']} updates; accuracy against the oracle on {summary['held_out_pairs']} "
             "held-out pairs. Mean over seeds (min-max).", ""]
    lines += markdown_table(
        ["fraction", "pairs", "updates", "final critic", "kept by community validation",
         "best checkpoint (oracle, evaluation only)", "its update per seed"],
        [[f"{r['fraction']:g}", str(r["n_pairs"]), str(r["updates"]), spread(r["final"]),
          spread(r["by_community_validation"]), spread(r["best_oracle"]),
          ", ".join(str(u) for u in r["best_oracle_update"])] for r in summary["fractions"]])
    lines += ["", "Per critic: accuracy against the oracle (community validation) at each checkpoint.", ""]
    for run in summary["runs"]:
        points = ", ".join(f"{c['update']}: {_pct(c['oracle_accuracy'])}"
                           + (f" ({_pct(c['community_validation'])})" if c["community_validation"] is not None
                              else "") for c in run["curve"])
        lines.append(f"- fraction {run['fraction']:g}, seed {run['seed']}: {points}")
    return "\n".join(lines) + "\n"
