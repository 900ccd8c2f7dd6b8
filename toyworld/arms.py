"""The toy world's answer to the question every team with preference data asks: train a critic and climb
it (ReFL), select with it (best-of-N), or tune the model on the feedback itself (Diffusion-DPO on the
pairs, Diffusion-KTO on per-image likes), judged by the taste the feedback came from (the oracle).

On a finished demo, `run_arms`:

1. writes the community's per-image feedback (`labelled_feedback`): every image of the pairs the critic
   learned from, liked when it is a pair's preferred (remixed) image, not liked when it is a rejected (seen,
   never remixed) one;
2. sweeps DPO's and KTO's beta and learning rate (GRID, written with the rule before any run) on that
   feedback, validating every few updates from update 0 on the demo's validation prompts, and chooses each
   method's (setting, update) by the written rule (toyworld/rule.py's `preference_rule_for`: the demo's
   critic as a held-out judge, the zero-shot CLIP and prompt fidelity held; never the oracle);
3. trains each method's choice with every training seed, and ReFL with the demo's settings and the same
   seeds (the world study's runs, shared);
4. compares, per seed, base, best-of-N by the critic, ReFL, DPO, KTO and ReFL with best-of-M on the demo's
   held-out prompts and sampling seeds (base samples copied from the demo), and reports, across seeds, each
   arm on the oracle and each of its terms, prompt fidelity, the zero-shot CLIP and the critic, its oracle
   win rate against base, and its cost (sampling per image shown; each run's recorded training compute).

Runs live under <demo>/arms/ (sweep/<method>/<setting>/, <method>/seed-N/, compare/seed-N/) and are reused
while their settings and inputs are unchanged; results in arms.json and arms.md. `quick` runs a tiny grid for
CI on a quick demo.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.arms import BASE, REFL, arm_name, comparison_name, model_label, parse_arm
from runkit.config import override
from toyworld.variants import interval_cell, markdown_table, slug

logger = logging.getLogger(__name__)

METHODS = ("dpo", "kto")
ORACLE = "oracle:"
# The sweep, written with the rule (toyworld/rule.py) before any run: beta from a fifth of Diffusion-DPO's
# SD 1.5 / SDXL default (5000, on ~850k pairs) to five times it (the config's advice for a small data set is
# to raise it), learning rates around ReFL's chosen 3e-4 and peers' LoRA rates (1e-4 to 1e-3).
GRID = {f"beta {beta}, lr {lr}": [f"beta={beta}", f"train.lr={lr}"]
        for beta in (1000, 5000, 25000) for lr in ("1e-4", "3e-4", "1e-3")}
# Every sweep run: 300 updates validated every 30 from update 0 (11 validations, as ReFL's sweep had 13),
# a constant learning rate (so a run's first U updates are what a U-update run trains), 8 pairs (DPO) or 16
# images (KTO: the same images per update) per update; the LoRA as ReFL's (demo refl.lora).
COMMON = ["train.max_updates=300", "train.validate_every=30", "train.checkpoint_every=30",
          "train.lr_schedule=constant", "train.warmup_updates=0"]
BATCH = {"dpo": 8, "kto": 16}
# The quick mode (CI on a quick demo): two settings, 4 updates validated at 0 and 4, small batches.
QUICK_GRID = {"beta 5000, lr 1e-3": ["beta=5000", "train.lr=1e-3"],
              "beta 1000, lr 1e-2": ["beta=1000", "train.lr=1e-2"]}
QUICK_COMMON = ["train.max_updates=4", "train.validate_every=4", "train.checkpoint_every=2",
                "train.lr_schedule=constant", "train.warmup_updates=0"]
# The seeds' runs of a chosen setting validate nothing (the comparison judges them): no validation prompts,
# no judges loaded.
UNVALIDATED = ["train.validation_prompts=[]", "train.heldout_evaluators=[]", "train.validate_at_start=false"]
QUICK_BATCH = {"dpo": 2, "kto": 4}


@dataclass
class ArmsConfig:
    """What `social-refl-world-arms` runs on a finished demo."""

    # A finished demo's output folder (`social-refl-demo --out DIR`).
    demo: str = "runs/demo"
    # Training seeds of ReFL, DPO and KTO (ReFL's seed 0 is the demo's own run).
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # CI's quick mode: a two-setting grid of 4 updates each, validated at 0 and 4, with small batches (on a
    # quick demo).
    quick: bool = False

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")


# ----------------------------------------------------------------------------- the feedback
def labelled_feedback(pairs: Path, out: Path) -> dict:
    """The community's per-image feedback in reward.data.LABEL_FORMATS["labelled"] (prompt, image, label):
    every image of the pairs file, liked (1) when it is a pair's preferred image, not liked (0) when it is a
    rejected one (the community's pairs hold exactly these two kinds: remixed, and seen but never remixed).
    Image paths relative to `out`'s folder. Writes `out`; returns its counts."""
    from runkit.files import atomic_write_bytes

    table = pd.read_parquet(pairs)
    base = pairs.parent
    rows: dict[str, dict] = {}
    for prompt, pos, neg in zip(table["prompt"], table["pos_path"], table["neg_path"]):
        for path, label in ((pos, 1), (neg, 0)):
            seen = rows.setdefault(path, {"prompt": prompt, "image": path, "label": label})
            if seen["label"] != label:  # a remixed image is never a pair's rejected one
                raise ValueError(f"{pairs}: {path} is both preferred and rejected; not a community's pairs")
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = pd.DataFrame([{"prompt": r["prompt"], "label": r["label"],
                            "image": os.path.relpath((base / r["image"]).resolve(), out.parent.resolve())}
                           for r in rows.values()], columns=["prompt", "image", "label"])
    atomic_write_bytes(out, lambda f: labels.to_parquet(f, index=False))
    n_liked = int(labels["label"].sum())
    return {"labels": str(out), "n_images": len(labels), "n_liked": n_liked,
            "n_not_liked": len(labels) - n_liked, "n_pairs": len(table)}


def kto_desirable_weight(n_liked: int, n_not_liked: int) -> float:
    """KTO's advice, lambda_D n_liked / (lambda_U n_not_liked) in [1, 4/3]: with fewer liked images than not,
    lambda_D = n_not_liked / n_liked (ratio 1); else 1."""
    return max(1.0, n_not_liked / max(n_liked, 1))


# ----------------------------------------------------------------------------- the runs
def preference_config(demo, method: str, feedback: Path, out: Path, overrides: list[str], batch: int,
                      desirable_weight: float = 1.0):
    """The demo's DPO or KTO run: the demo's base model and ReFL's LoRA shape, the feedback, the demo's
    validation prompts and sampling settings (ReFL's sampler as the demo's ReFL stage reads it on the base
    model's family), judged by the critic, the zero-shot CLIP, the oracle and prompt fidelity at every
    validation; then `overrides`."""
    from preference.config import PreferenceConfig, PreferenceDataConfig, PreferenceTrainConfig
    from refl.components import ModelConfig
    from toyworld.demo.config import fitting_scheduler
    from toyworld.world import heldout_prompts

    d = demo.cfg
    train = PreferenceTrainConfig(
        output_dir=str(out), batch_size=batch, resume="latest", validate_at_start=True,
        mixed_precision=d.refl.train.mixed_precision,
        validation_prompts=heldout_prompts("validation", d.n_validation_prompts),
        validation_num_inference_steps=d.num_inference_steps, validation_guidance_scale=d.guidance_scale,
        heldout_evaluators=judges(demo))
    cfg = PreferenceConfig(method=method, model=ModelConfig(name=d.sd_model), lora=replace(d.refl.lora),
                           scheduler=fitting_scheduler(d, d.refl.step.scheduler),
                           desirable_weight=desirable_weight,
                           data=PreferenceDataConfig(train=str(feedback),
                                                     format="social" if method == "dpo" else "labelled"),
                           train=train)
    return override(cfg, overrides)


def judges(demo) -> list[str]:
    """The held-out judges every preference run validates with: the critic (the rule's), the zero-shot CLIP,
    the oracle (logged for evaluation after the choice; the rule refuses it) and prompt fidelity."""
    return [f"critic:{demo.critic}", f"clip:{demo.cfg.clip_model}", ORACLE, "fidelity:"]


def stage_preference(cfg, out: Path, inputs: dict[str, str]) -> dict:
    """Train (or reuse) one preference run in `out`; its result with the LoRA folder where it lies."""
    from preference.train import train
    from toyworld.demo.stages import enter_stage, trainer_settings

    result_file = out / "result.json"
    done = enter_stage(out, result_file, trainer_settings(cfg), inputs)
    if done is None:
        done = train(cfg)
    return dict(done, output_dir=str(out), lora=str(out / "lora"))


def zero_lora(demo, out: Path) -> str:
    """A LoRA whose update is zero (B = 0, as a fresh adapter): the base model itself as a tuned arm, for a
    method whose rule kept update 0."""
    from refl.components import load_components
    from refl.lora import add_lora, save_lora

    if not (out / "pytorch_lora_weights.safetensors").is_file():
        components = load_components(demo.cfg.sd_model)
        add_lora(components, demo.cfg.refl.lora)
        save_lora(components, out)
    return str(out)


def sweep_method(demo, method: str, feedback: Path, root: Path, grid: dict, common: list[str], batch: int,
                 weight: float, inputs: dict[str, str], rule) -> dict:
    """Every setting of `grid` for `method`, then the rule's choice over (setting, update)."""
    from refl.sweep import choose, validations
    from runkit.logs import read_metrics

    configs = {name: preference_config(demo, method, feedback, root / slug(name), common + overrides, batch,
                                       weight) for name, overrides in grid.items()}  # all checked first
    runs, spent = {}, {}
    for name, cfg in configs.items():
        logger.info("arms sweep: %s, %s in %s", method, name, cfg.train.output_dir)
        result = stage_preference(cfg, Path(cfg.train.output_dir), inputs)
        runs[name] = read_metrics(Path(cfg.train.output_dir) / "metrics.jsonl")
        spent[name] = result.get("compute")
    choice = choose(runs, rule)
    keys = ["update", rule.maximise, *rule.hold]
    return {"grid": grid, "common": common, "batch_size": batch, "desirable_weight": weight,
            "choice": {"setting": choice["run"], "overrides": grid[choice["run"]],
                       "update": choice["update"]},
            "per_run": choice["per_run"], "compute": spent,
            "curves": {name: [{k: r[k] for k in keys} for r in validations(rows, rule.maximise)]
                       for name, rows in runs.items()},
            "evaluation": _oracle_after_choice(runs, rule, choice)}


def _oracle_after_choice(runs: dict[str, list[dict]], rule, choice: dict) -> dict:
    """Evaluation only, after the choice: per setting the oracle on its validation curve (at update 0, at its
    peak, at the rule's pick of that setting) from the judges logged beside the rule's."""
    from refl.sweep import HELDOUT, validations

    key = HELDOUT + ORACLE
    out = {}
    for name, records in runs.items():
        rows = validations(records, rule.maximise)
        if not rows or key not in rows[0]:
            continue
        peak = max(rows, key=lambda r: (r[key], -int(r["update"])))
        top = choice["per_run"][name]
        at_pick = next((r[key] for r in rows if top is not None and int(r["update"]) == int(top["update"])),
                       None)
        out[name] = {"oracle_base": rows[0][key], "oracle_peak": {"update": int(peak["update"]),
                                                                  "oracle": peak[key]},
                     "oracle_at_pick": at_pick, "oracle_last": rows[-1][key]}
    return out


def train_choice(demo, method: str, feedback: Path, folder: Path, sweep: dict, seed: int,
                 inputs: dict[str, str], quick: bool) -> dict:
    """The method's chosen setting trained for the chosen number of updates with training seed `seed`, without
    validation (the comparison judges it); the base itself (a zero LoRA) when the rule kept update 0."""
    updates = sweep["choice"]["update"]
    if updates == 0:
        return {"lora": zero_lora(demo, folder / "lora"), "updates": 0, "compute": None}
    common = QUICK_COMMON if quick else COMMON
    overrides = [*common, *sweep["choice"]["overrides"], f"train.max_updates={updates}", f"train.seed={seed}",
                 *UNVALIDATED]
    cfg = preference_config(demo, method, feedback, folder, overrides, sweep["batch_size"],
                            sweep["desirable_weight"])
    return stage_preference(cfg, folder, inputs)


def refl_run(demo, seed: int) -> dict:
    """ReFL with the demo's settings and training seed `seed`: the demo's own run at its seed, else the
    world study's run (toyworld/study.py keeps them in <demo>/study/refl/seed-N/refl), trained if missing."""
    from toyworld.demo.layout import critic_dirs
    from toyworld.demo.stages import stage_refl
    from toyworld.study import PLAIN
    from toyworld.world import split_prompts

    cfg = override(demo.cfg, [f"refl.train.seed={int(seed)}"])
    own = seed == demo.cfg.refl.train.seed
    folder = demo.folder / "refl" if own else demo.folder / "study" / slug(PLAIN) / f"seed-{seed}" / "refl"
    members = critic_dirs(demo.folder / "critic", demo.cfg.n_critic_members)
    reward = members if len(members) > 1 else str(demo.critic)
    return stage_refl(cfg, reward, split_prompts(seed=0)[0], folder)


def compare_seed(demo, folder: Path, loras: dict[str, str], own_refl: bool) -> dict:
    """The demo's comparison (its prompts, sampling seeds and judges, best-of-M on each tuned model) with
    ReFL, DPO and KTO as tuned models; the demo's base samples (and its ReFL samples at its own seed) are
    copied, not drawn again (their fingerprints are checked all the same)."""
    from evaluation.harness import run_compare
    from toyworld.demo.config import compare_config
    from toyworld.variants import copy_base_samples

    copy_base_samples(demo.folder, folder, models=(BASE, REFL) if own_refl else (BASE,))
    ccfg = compare_config(demo.cfg, str(demo.critic), loras[REFL], demo.prompts_file, folder)
    ccfg = replace(ccfg, loras={m: path for m, path in loras.items() if m != REFL}, tuned_best_of=True)
    return run_compare(ccfg)


# ----------------------------------------------------------------------------- the study
def run_arms(demo_dir: str | Path, seeds=(0, 1, 2), quick: bool = False) -> dict:
    """Sweep DPO and KTO by the written rule, train each choice and ReFL with every seed, compare them all
    per seed; writes <demo>/arms/arms.json and arms.md and returns the summary."""
    from runkit.files import atomic_write_text, content_hash, write_json
    from toyworld.demo.layout import community_pairs_file
    from toyworld.rule import preference_rule_for
    from toyworld.variants import open_demo

    demo = open_demo(demo_dir)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    rule = preference_rule_for(str(demo.critic), demo.cfg.clip_model)
    rule.check()
    root = demo.folder / "arms"
    pairs = community_pairs_file(demo.folder)
    feedback = {"dpo": pairs, "kto": root / "feedback" / "labels.parquet"}
    labels = labelled_feedback(pairs, feedback["kto"])
    weight = {"dpo": 1.0, "kto": kto_desirable_weight(labels["n_liked"], labels["n_not_liked"])}
    grid, common, batch = (QUICK_GRID, QUICK_COMMON, QUICK_BATCH) if quick else (GRID, COMMON, BATCH)
    inputs = {"sd_model": demo.cfg.sd_model, "critic": str(demo.critic), "clip_model": demo.cfg.clip_model,
              "pairs": str(pairs.parent)}  # the images; the labels file holds their paths
    inputs = {"dpo": inputs, "kto": {**inputs, "labels": str(feedback["kto"])}}
    sweeps = {m: sweep_method(demo, m, feedback[m], root / "sweep" / m, grid, common, batch[m], weight[m],
                              inputs[m], rule) for m in METHODS}
    per_seed, training = {}, {}
    for seed in seeds:
        refl = refl_run(demo, seed)
        loras = {REFL: str(Path(refl["output_dir"]) / "lora")}
        for m in METHODS:
            run = train_choice(demo, m, feedback[m], root / m / f"seed-{seed}", sweeps[m], seed, inputs[m],
                               quick)
            loras[m] = run["lora"]
        folder = root / "compare" / f"seed-{seed}"
        results = compare_seed(demo, folder, loras, own_refl=seed == demo.cfg.refl.train.seed)
        per_seed[int(seed)] = judge_seed(folder, results)
        training[int(seed)] = results["training_compute"]
    summary = {"demo": str(demo.folder), "seeds": [int(s) for s in seeds], "quick": quick,
               "rule": {"maximise": rule.maximise, "hold": rule.hold},
               "feedback": {**labels, "labels": str(feedback["kto"].relative_to(demo.folder)),
                            "labels_content": content_hash(feedback["kto"])},
               "sweeps": sweeps, "per_seed": per_seed, "training_compute": training,
               "across_seeds": aggregate(per_seed)}
    write_json(root / "arms.json", summary)
    atomic_write_text(root / "arms.md", arms_markdown(summary) + "\n")
    return summary


def headline(results: dict) -> list[str]:
    """The arms the question is about, in the table's order: base, best-of-N by the critic, ReFL, DPO, KTO,
    ReFL with best-of-M."""
    n, m = results["n_samples"], results["n_tuned_samples"]
    return [arm_name(BASE), arm_name(BASE, n), arm_name(REFL), arm_name("dpo"), arm_name("kto"),
            arm_name(REFL, m)]


def judge_seed(folder: Path, results: dict) -> dict:
    """One seed's numbers per arm: each judge's mean, the oracle's terms, the change from base's one sample on
    the oracle (paired per prompt, 95% interval), the oracle win rate against base's one sample, the
    sampling cost per image shown and (tuned models) the training its run recorded."""
    from toyworld.demo.analysis import arm_oracle_terms

    arms = headline(results)
    terms = arm_oracle_terms(folder, results, arms)
    base = arm_name(BASE)
    out = {}
    for arm in arms:
        row = results["arms"][arm]
        model = parse_arm(arm)[0]
        out[arm] = {
            "judges": {s: row["scores"][s]["mean"] for s in results["evaluators"]},
            "terms": {t: float(v.mean()) for t, v in terms[arm].items()},
            "oracle_minus_base": (results["change_from_base"][ORACLE][arm] if arm != base else None),
            "oracle_win_rate": (results["win_rates"][ORACLE][comparison_name(arm, base)]
                                if arm != base else None),
            "denoiser_evaluations_per_image": row["unet_evals_per_prompt"],
            "sampling_seconds_per_image": row["seconds_per_prompt"],
            "training": results["training_compute"].get(model) if model != BASE else None,
        }
    return {"evaluators": results["evaluators"], "selector": results["selector"],
            "n_samples": results["n_samples"], "n_tuned_samples": results["n_tuned_samples"],
            "n_prompts": len(results["prompts"]), "arms": out}


def _spread(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "per_seed": v.tolist()}


def aggregate(per_seed: dict[int, dict]) -> dict:
    """Across seeds, per arm: mean and std of each judge, term, the oracle change, the win rate and the
    training compute; how many seeds have the oracle change's interval above / below 0."""
    first = next(iter(per_seed.values()))
    out = {}
    for arm, row in first["arms"].items():
        rows = [s["arms"][arm] for s in per_seed.values()]
        entry = {"judges": {j: _spread([r["judges"][j] for r in rows]) for j in row["judges"]},
                 "terms": {t: _spread([r["terms"][t] for r in rows]) for t in row["terms"]},
                 "denoiser_evaluations_per_image": row["denoiser_evaluations_per_image"]}
        if row["oracle_minus_base"] is not None:
            entry["oracle_minus_base"] = _spread([r["oracle_minus_base"]["mean"] for r in rows])
            entry["seeds_above_zero"] = sum(r["oracle_minus_base"]["ci95"][0] > 0 for r in rows)
            entry["seeds_below_zero"] = sum(r["oracle_minus_base"]["ci95"][1] < 0 for r in rows)
            entry["oracle_win_rate"] = _spread([r["oracle_win_rate"]["mean"] for r in rows])
        spent = [r["training"] for r in rows if r["training"]]
        if spent:  # the seeds whose run recorded it (runs trained before runs recorded it have none)
            entry["training"] = {k: _spread([s[k] for s in spent])
                                 for k in ("seconds_training", "denoiser_forwards", "denoiser_backwards")}
            entry["training_seeds"] = len(spent)
        out[arm] = entry
    return out


# ----------------------------------------------------------------------------- the tables
def per_seed(summary: dict) -> dict[int, dict]:
    """The summary's per-seed numbers by seed (arms.json keys them by the seed's text)."""
    return {int(seed): row for seed, row in summary["per_seed"].items()}


def arm_title(arm: str) -> str:
    """An arm as the tables name it: "base", "best-of-64 by the critic", "ReFL", "ReFL + best-of-16"."""
    model, n = parse_arm(arm)
    if model == BASE:
        return "base" if n is None else f"best-of-{n} by the critic"
    return model_label(model) + ("" if n is None else f" + best-of-{n} by the critic")


def _judge_label(spec: str, selector: str) -> str:
    from evaluation.report import short_name
    from toyworld.evaluators import JUDGE_LABELS

    return short_name(spec, {selector: "critic", **JUDGE_LABELS})


def _pm(entry: dict, digits: int = 3) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def _training_cell(entry: dict, n_seeds: int, kept_base: bool) -> str:
    if kept_base:
        return "none: the rule kept update 0 (this arm is the base)"
    spent = entry.get("training")
    if not spent:
        return "-"
    f, b, s = spent["denoiser_forwards"], spent["denoiser_backwards"], spent["seconds_training"]
    k = entry["training_seeds"]
    seeds = "" if k == n_seeds else f"; {k} of {n_seeds} seeds recorded"
    return f"{f['mean']:,.0f} + {b['mean']:,.0f} ({s['mean']:.0f} s{seeds})"


def answer_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The answer table: per arm, the oracle (mean ± std over seeds), its change from base per seed with
    the interval, the oracle win rate against base, prompt fidelity, the zero-shot CLIP, the critic, and
    the cost."""
    first = next(iter(summary["per_seed"].values()))
    sel, seeds = first["selector"], summary["seeds"]
    specs = [ORACLE] + [s for s in first["evaluators"] if s != ORACLE]
    header = ["arm", *(_judge_label(s, sel) for s in specs), "oracle win rate vs base",
              *(f"oracle - base, seed {s}" for s in seeds),
              "denoiser evaluations per image shown", "training: forwards + backwards in images (seconds)"]
    rows = []
    for arm, agg in summary["across_seeds"].items():
        cells = [arm_title(arm), *(_pm(agg["judges"][s]) for s in specs)]
        cells.append(_pm(agg["oracle_win_rate"], 2) if "oracle_win_rate" in agg else "-")
        cells += [interval_cell(per_seed(summary)[s]["arms"][arm]["oracle_minus_base"])
                  if "oracle_minus_base" in agg else "-" for s in seeds]
        model = parse_arm(arm)[0]
        kept_base = model in summary["sweeps"] and summary["sweeps"][model]["choice"]["update"] == 0
        cells += [f"{agg['denoiser_evaluations_per_image']:,}", _training_cell(agg, len(seeds), kept_base)]
        rows.append(cells)
    return header, rows


def terms_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The oracle's terms per arm, mean ± std over seeds."""
    arms = summary["across_seeds"]
    terms = list(next(iter(arms.values()))["terms"])
    header = ["arm", *(f"oracle term: {t}" for t in terms)]
    return header, [[arm_title(arm), *(_pm(agg["terms"][t]) for t in terms)]
                    for arm, agg in arms.items()]


def arms_markdown(summary: dict) -> str:
    """The study as markdown: the answer table, the oracle's terms, then each method's sweep and choice."""
    first = next(iter(summary["per_seed"].values()))
    fb = summary["feedback"]
    quick = " Quick mode: not a result." if summary["quick"] else ""
    lines = [f"{len(summary['seeds'])} training seeds ({', '.join(map(str, summary['seeds']))}) on "
             f"{first['n_prompts']} held-out prompts; base and best-of-{first['n_samples']} are the same "
             "samples for every seed; each tuned model's one-sample score is the mean of "
             f"{first['n_tuned_samples']} samples per prompt, on base's seeds. Mean ± std over seeds; "
             "oracle - base per seed: mean over prompts [95% interval]. The feedback: "
             f"{fb['n_pairs']} pairs (ReFL's critic, DPO) over {fb['n_images']} images, {fb['n_liked']} "
             f"liked (remixed) and {fb['n_not_liked']} not (KTO).{quick}", ""]
    lines += markdown_table(*answer_rows(summary)) + [""]
    lines += markdown_table(*terms_rows(summary)) + [""]
    rule = summary["rule"]
    held = ", ".join(f"{_judge_label(k.split('/', 2)[2], '')} within {v:g} of update 0"
                     for k, v in rule["hold"].items())
    lines += ["DPO's and KTO's settings by the rule written before the sweep (docs/preference.md): the "
              f"highest critic score on the validation images over (setting, update) with {held}; the oracle "
              "is evaluation only. Training compute: denoiser forwards + backwards in images, and seconds, "
              "of each arm's own run (the sweep's runs come on top: sweep/<method>/*/result.json).", ""]
    for method, sweep in summary["sweeps"].items():
        c = sweep["choice"]
        lines += [f"### {model_label(method)}: {c['setting']}, update {c['update']}", ""]
        header = ["setting", "best admissible update", "critic (update 0 -> it)",
                  *(f"{_judge_label(k.split('/', 2)[2], '')} (update 0 -> it; may drop {v:g})"
                    for k, v in rule["hold"].items()),
                  "oracle: update 0, peak, at the pick (evaluation only)"]
        rows = []
        for name, curve in sweep["curves"].items():
            top, ev = sweep["per_run"][name], sweep["evaluation"].get(name)
            oracle = "-"
            if ev:
                at_pick = "-" if ev["oracle_at_pick"] is None else f"{ev['oracle_at_pick']:.3f}"
                oracle = (f"{ev['oracle_base']:.3f}, {ev['oracle_peak']['oracle']:.3f} (update "
                          f"{ev['oracle_peak']['update']}), {at_pick}")
            if top is None:
                rows.append([name, "none", "-", *(["-"] * len(rule["hold"])), oracle])
                continue
            base = curve[0]
            key = rule["maximise"]
            rows.append([name, str(top["update"]), f"{base[key]:.3f} -> {top[key]:.3f}",
                         *(f"{base[k]:.3f} -> {top[k]:.3f}" for k in rule["hold"]), oracle])
        lines += markdown_table(header, rows) + [""]
    return "\n".join(lines)


def arms_table_html(summary: dict) -> str:
    """The answer table for the demo's report.html."""
    import html

    header, rows = answer_rows(summary)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return ("<h2>Critic and ReFL, or tuning on the feedback itself?</h2><p class='note'>"
            "social-refl-world-arms: DPO and KTO on the community's own feedback, settings chosen by a rule "
            f"written before the sweep, {len(summary['seeds'])} training seeds; each seed's full report is "
            "arms/compare/seed-N/report.html and the sweep is in arms/arms.md.</p>"
            f"<table><tr>{head}</tr>{body}</table>")
