"""The flywheel on the toy world: the community judges the tuned model, and the next round learns from it.

Round 0 is a finished demo (for training seed s other than the demo's, the world study's run of that seed,
toyworld/study.py): the base model's feed, the community's pairs, the critic, ReFL by the sweep's settings.
Round r = 1 .. n_rounds, per training seed (docs/flywheel.md says why each choice):

1. feed: fresh training prompts (none an earlier round showed), each with the community's feed guidance
   scales; `base_share` of each prompt's images drawn by the base, the rest by round r-1's tuned model
   (refl.feed, the feed command's writer; one sub-feed per model);
2. feedback: the same simulated community (the demo's behaviour and size, new users' draws each round)
   remixes on the mixed feed -> pairs over the feed's images;
3. critic: the demo's recipe started from round r-1's critic (train.init_from; `critic_start`: previous) or
   from the demo's starting point (`critic_start`: base), on every round's pairs so far (or the last
   `n_feedback_rounds`);
4. ReFL: each setting of `refl_settings` (default: the sweep's grid), started from round r-1's LoRA
   (`refl_start`: previous) with validation from update 0 on the validation prompts; the sweep rule
   (toyworld/rule.py) picks the (setting, update) with the highest reward whose zero-shot CLIP and prompt
   fidelity stay within their drops of the base (`hold_reference`: base); it never sees the oracle. Its
   checkpoint's LoRA is round r's tuned model;
5. evaluation (the oracle only measures): the critic against the oracle on held-out pairs of the base's
   samples, of round r-1's model's (the model its feed came from) and of round r's (where ReFL took it),
   with round r-1's critic beside it; the comparison harness on the demo's held-out prompts (the same seeds
   every round): ReFL minus base per judge and per oracle term with 95% intervals, the gain over round r-1,
   the win rate; the over-optimisation curve of the chosen run.

Layout: <demo>/flywheel/seed-S/round-R/ holds feed/{base,model}/, feedback/, critic_data/, critic/,
refl/<setting>/, lora/, heldout/, compare/, overoptimisation.png and round.json (its numbers); round 0 keeps
only what the loop adds to the demo (held-out pairs of its tuned model, round.json). Across rounds and seeds:
<demo>/flywheel/flywheel.json, flywheel.md and flywheel.png (toyworld/flywheel_report.py). A round is reused
while its settings and inputs (the previous round's LoRA and critic) are unchanged; an interrupted one
resumes its finished steps.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from runkit.config import ConfigError, override
from toyworld.variants import FinishedDemo, open_demo, parse_variant, slug

logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (0, 1, 2)
REFL_STARTS = ("previous", "base")
CRITIC_STARTS = ("previous", "base")
# Keys added after the loop's first full run: in a round's key only when set away from their default, so
# the rounds made before them stay reusable.
KEYED_WHEN_SET = {"critic_start": "previous"}
HOLD_REFERENCES = ("base", "start")
# A round's seed offsets: its feed and its held-out draws, far apart from each other and from the demo's
# (toyworld.demo.stages: the feed from 0, the held-out generations from 500,000 per community seed).
ROUND_SEED, HELDOUT_SEED = 10_000_000, 20_000_000
REWARD = "reward"  # how a round's numbers name the critic its ReFL climbed (the comparison's selector)


def _sweep_settings() -> list[str]:
    from toyworld.sweep import GRID

    return [f"{name}: {' '.join(overrides)}" for name, overrides in GRID.items()]


def _sweep_common() -> list[str]:
    from toyworld.sweep import COMMON

    return list(COMMON)


@dataclass
class FlywheelConfig:
    """What `social-refl-world-flywheel` runs on a finished demo (round 0)."""

    # A finished demo's output folder: round 0, and where flywheel/ is written.
    demo: str = "runs/demo"
    # Rounds after the demo's: round r's feed is drawn from round r-1's tuned model.
    n_rounds: int = 3
    # Training seeds of the whole loop: seed s trains ReFL with refl.train.seed = s (round 0 is the world
    # study's run of that seed; the demo's own run for its seed) and each round's critic with
    # critic.train.seed + s. The community and the prompts are the same for every seed.
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    # Training prompts of each round's feed (fresh ones each round); 0 = the demo's community.n_prompts.
    n_prompts: int = 0
    # Share of each prompt's feed images drawn by the base model (the rest by the current tuned model): 0 =
    # only the tuned model, 1 = only the base (a control: as much new feedback, none on the tuned model).
    base_share: float = 0.5
    # Rounds of feedback each critic trains on, the newest first (round 0's is the demo's community pairs);
    # 0 = every round's.
    n_feedback_rounds: int = 0
    # Where each round's ReFL starts: "previous" (round r-1's LoRA, train.init_from) or "base" (a fresh LoRA).
    refl_start: str = "previous"
    # Where each round's critic starts: "previous" (round r-1's critic, train.init_from: the demo's epochs
    # again over all the pairs) or "base" (the demo's starting point, clip_model: trained afresh on them).
    critic_start: str = "previous"
    # What the rule's held judges may not drop from: "base" (the base model's validation: drops add up over
    # rounds) or "start" (each run's update 0, as in one sweep).
    hold_reference: str = "base"
    # ReFL settings the rule chooses among each round, "name: key=value ..." as demo-config overrides
    # (toyworld.sweep.GRID by default).
    refl_settings: list[str] = field(default_factory=_sweep_settings)
    # Demo-config overrides of every round after round 0: the critic's recipe, the sizes of the feed's
    # community, the held-out pairs and the comparison, every ReFL run (toyworld.sweep.COMMON by default: 120
    # updates, validated every 10 from update 0; each run also checkpoints at every validation and keeps them
    # all, so the chosen update's LoRA is there). Not the validation itself: the rule compares with round 0's.
    demo_overrides: list[str] = field(default_factory=_sweep_common)

    def __post_init__(self):
        if self.n_rounds < 1:
            raise ConfigError(f"n_rounds must be >= 1, got {self.n_rounds}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not 0.0 <= self.base_share <= 1.0:
            raise ConfigError(f"base_share must be in [0, 1], got {self.base_share}")
        if self.n_prompts < 0 or self.n_feedback_rounds < 0:
            raise ConfigError("n_prompts and n_feedback_rounds must be >= 0")
        if self.refl_start not in REFL_STARTS:
            raise ConfigError(f"refl_start={self.refl_start!r}; choose one of {', '.join(REFL_STARTS)}")
        if self.critic_start not in CRITIC_STARTS:
            raise ConfigError(f"critic_start={self.critic_start!r}; choose one of {', '.join(CRITIC_STARTS)}")
        if self.hold_reference not in HOLD_REFERENCES:
            raise ConfigError(f"hold_reference={self.hold_reference!r}; choose one of "
                              f"{', '.join(HOLD_REFERENCES)}")
        if not self.refl_settings:
            raise ConfigError("refl_settings is empty: list at least one 'name: key=value ...' setting")


# The quick loop for smoke tests and CI: 2 rounds, one seed, 4 feed prompts, one ReFL setting of one update
# without the regulariser (its pool of base samples would cost more than the rest of the run), small critic,
# held-out and comparison draws.
QUICK = {"n_rounds": 2, "seeds": [0], "n_prompts": 4,
         "refl_settings": ["lr 3e-4, training CFG 4: refl.train.lr=3e-4 refl.step.guidance_scale=4.0"],
         "demo_overrides": ["refl.train.max_updates=1", "refl.train.validate_every=1",
                            "refl.train.validate_at_start=true", "refl.train.batch_size=2",
                            "refl.step.reg_weight=0", "critic.train.max_updates=4",
                            "community.n_oracle_pair_prompts=4", "community.oracle_images_per_prompt=3",
                            "compare.n_tuned_samples=4"]}


@dataclass
class _Loop:
    """What every round of every seed shares: the demo, the loop's config, the settings' demo configs, the
    held-out truths and each round's feed prompts."""

    demo: FinishedDemo
    cfg: FlywheelConfig
    dcfg: object  # the demo's config with the loop's demo_overrides: what every round after round 0 runs
    settings: dict  # setting name -> its demo-config overrides
    prompts: list  # per round r: its feed prompts (round 0's are the demo's own)
    base_truth: list  # the demo's held-out oracle pairs (reward.data PairRecords) ...
    base_gaps: np.ndarray  # ... and their oracle gaps (N,)

    @property
    def root(self) -> Path:
        return self.demo.folder / "flywheel"


# What a validation draws and who judges it: the same in every round as in round 0's run, whose update 0 (the
# base) the rule's held judges are measured from.
VALIDATION = ("validation_prompts", "validation_images_per_prompt", "validation_seed",
              "validation_num_inference_steps", "validation_guidance_scale", "heldout_evaluators")


def _check(demo: FinishedDemo, cfg: FlywheelConfig) -> tuple[object, dict[str, list[str]]]:
    """The rounds' demo config and every setting's overrides, applied and checked before anything trains:
    the rule's judges are validated, and validated as in round 0's run. Returns (the rounds' demo config,
    setting -> overrides)."""
    from refl.sweep import HELDOUT
    from toyworld.demo.config import refl_config
    from toyworld.rule import rule_for

    dcfg = override(demo.cfg, cfg.demo_overrides)
    settings = dict(parse_variant(spec) for spec in cfg.refl_settings)
    rule = rule_for(demo.cfg.clip_model)
    round0 = refl_config(demo.cfg, str(demo.critic), demo.folder, demo.folder, None).train
    for name, overrides in settings.items():
        setting = override(dcfg, overrides)
        t = refl_config(setting, str(demo.critic), demo.folder, demo.folder, None).train
        if not t.validate_at_start or not t.validation_prompts:
            raise ConfigError(f"refl setting {name!r}: the rule reads validations from update 0; keep "
                              "refl.train.validate_at_start=true and the validation prompts")
        held = [k.removeprefix(HELDOUT) for k in rule.hold]
        missing = [k for k in held if k not in t.heldout_evaluators]
        if missing:
            raise ConfigError(f"refl setting {name!r}: the rule holds {missing}, which "
                              f"refl.train.heldout_evaluators ({t.heldout_evaluators}) does not validate")
        changed = [k for k in VALIDATION if getattr(t, k) != getattr(round0, k)]
        if changed and cfg.hold_reference == "base":
            raise ConfigError(f"refl setting {name!r} validates otherwise than round 0 "
                              f"({', '.join(changed)}); the rule measures its held judges from round 0's "
                              "validation: keep them")
    return dcfg, settings


def round_prompts(demo: FinishedDemo, n_rounds: int, n_prompts: int) -> list[list[str]]:
    """Each round's feed prompts: round 0's are the demo community's; round r's `n_prompts` (0: as many as
    round 0's), a random draw of training prompts no earlier round showed."""
    from toyworld.world import split_prompts

    train = split_prompts(seed=0)[0]
    c = demo.cfg.community
    rng = np.random.default_rng(demo.cfg.seed)  # as the demo's community stage draws
    rounds = [[train[i] for i in rng.choice(len(train), c.n_prompts, replace=False)]]
    n = n_prompts or c.n_prompts
    for r in range(1, n_rounds + 1):
        shown = {p for prompts in rounds for p in prompts}
        fresh = [p for p in train if p not in shown]
        if len(fresh) < n:
            raise ConfigError(f"round {r} needs {n} fresh training prompts, {len(fresh)} are left of "
                              f"{len(train)}: lower n_prompts or n_rounds")
        pick = np.random.default_rng([demo.cfg.seed, r]).choice(len(fresh), n, replace=False)
        rounds.append([fresh[i] for i in sorted(pick)])
    return rounds


def run_flywheel(cfg: FlywheelConfig) -> dict:
    """Every round of every seed (finished ones reused), then the summary across rounds: writes
    <demo>/flywheel/flywheel.json, flywheel.md and flywheel.png and returns the summary."""
    from reward.data import load_pairs
    from runkit.config import save_config
    from toyworld.critic_vs_oracle import pair_gaps
    from toyworld.demo.layout import oracle_pairs_file
    from toyworld.flywheel_report import plot_rounds, summarise, write_summary

    demo = open_demo(cfg.demo)
    dcfg, settings = _check(demo, cfg)
    prompts = round_prompts(demo, cfg.n_rounds, cfg.n_prompts or dcfg.community.n_prompts)
    truth = load_pairs(oracle_pairs_file(demo.folder))
    loop = _Loop(demo, cfg, dcfg, settings, prompts, truth, pair_gaps(truth))
    loop.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, loop.root / "config.yaml")
    per_seed = {}
    for seed in cfg.seeds:
        rounds = [_round_zero(loop, int(seed))]
        for r in range(1, cfg.n_rounds + 1):
            logger.info("flywheel: seed %d, round %d", seed, r)
            rounds.append(_round(loop, int(seed), r, rounds[-1]))
        per_seed[int(seed)] = rounds
    summary = summarise(loop.demo, cfg, per_seed)
    summary["chart"] = str(plot_rounds(summary, loop.root / "flywheel.png"))
    write_summary(summary, loop.root)
    return summary


def _seed_dir(loop: _Loop, seed: int, r: int) -> Path:
    return loop.root / f"seed-{seed}" / f"round-{r}"


def _round_zero(loop: _Loop, seed: int) -> dict:
    """Round 0 of `seed`: the demo's own run at its seed, else the world study's run of the seed (trained
    there if it is not yet), measured as every later round is."""
    from runkit.logs import read_metrics
    from toyworld.demo.layout import community_pairs_file
    from toyworld.demo.stages import enter_stage
    from toyworld.study import PLAIN, STUDIES
    from toyworld.variants import run_variants

    demo = loop.demo
    run = run_variants(demo, demo.folder / "study", {PLAIN: STUDIES["world"][PLAIN]}, [seed])[PLAIN][seed]
    out = _seed_dir(loop, seed, 0)
    # Measured once while the run, the critic and what the loop draws for it are unchanged.
    key = {"round": 0, "seed": seed, "overrides": loop.cfg.demo_overrides}
    inputs = {"lora": run.refl["lora"], "critic": str(demo.critic),
              "results": str(run.folder / "results.json")}
    done = enter_stage(out, out / "round.json", key, inputs)
    if done is not None:
        return _located(done, out)
    refl_dir = Path(run.refl["output_dir"])
    records = read_metrics(refl_dir / "metrics.jsonl")
    state = {"round": 0, "critic": str(demo.critic), "previous_critic": demo.cfg.clip_model,
             "lora": run.refl["lora"], "refl_run": str(refl_dir), "compare": str(run.folder),
             "pairs": str(community_pairs_file(demo.folder)), "base_validation": _base_row(records),
             "heldout_start": None}
    chosen = {"setting": "the demo's (the sweep's choice)", "update": run.refl["updates"]}
    return _measure(loop, seed, out, state, run.results, records, chosen)


def _base_row(records: list[dict]) -> dict:
    """The update-0 validation of a run that started from the base: what held judges are measured from."""
    from refl.sweep import validations

    rows = validations(records)
    if not rows or int(rows[0]["update"]) != 0:
        raise ValueError("round 0's ReFL run has no validation at update 0 (the base); the flywheel's rule "
                         "needs one: rerun the demo with refl.train.validate_at_start=true")
    return rows[0]


def round_settings(cfg: FlywheelConfig) -> dict:
    """The loop's settings in every round's key: all but where it runs and how far (demo, n_rounds, seeds),
    and a KEYED_WHEN_SET key only when set away from its default."""
    return {k: v for k, v in vars(cfg).items() if k not in ("demo", "n_rounds", "seeds")
            and not (k in KEYED_WHEN_SET and KEYED_WHEN_SET[k] == v)}


def _round(loop: _Loop, seed: int, r: int, prev: dict) -> dict:
    """Round r of `seed` from the previous round's state (its LoRA, critic and measurements)."""
    from toyworld.demo.stages import enter_stage

    out = _seed_dir(loop, seed, r)
    finished = out / "round.json"
    key = {"flywheel": round_settings(loop.cfg),
           "seed": seed, "round": r, "prompts": loop.prompts[r]}
    # Its inputs: the previous round's LoRA and critic (which every earlier round's feedback shaped).
    done = enter_stage(out, finished, key, {"previous_lora": prev["lora"], "previous_critic": prev["critic"]})
    if done is not None:
        return _located(done, out)
    timings = {}
    t0 = time.perf_counter()
    feed = _feed(loop, seed, r, prev, out)
    timings["feed_s"] = time.perf_counter() - t0
    feedback = _feedback(loop, r, feed, out / "feedback")
    timings["feedback_s"] = time.perf_counter() - t0 - sum(timings.values())
    critic = _critic(loop, seed, r, prev, out)
    timings["critic_s"] = time.perf_counter() - t0 - sum(timings.values())
    chosen, runs = _refl(loop, seed, r, prev, critic, out)
    timings["refl_s"] = time.perf_counter() - t0 - sum(timings.values())
    state = {"round": r, "critic": critic, "previous_critic": prev["critic"], "lora": str(out / "lora"),
             "refl_run": str(runs[chosen["setting"]]), "compare": str(out / "compare"),
             "pairs": str(out / "feedback" / "pairs.parquet"), "base_validation": prev["base_validation"],
             "heldout_start": prev["heldout_tuned"], "feed": feed, "feedback": feedback, "timings": timings}
    results = _compare(loop, critic, str(out / "lora"), out / "compare")
    timings["compare_s"] = time.perf_counter() - t0 - sum(timings.values())
    from runkit.logs import read_metrics

    return _measure(loop, seed, out, state, results, read_metrics(Path(state["refl_run"]) / "metrics.jsonl"),
                    chosen, previous=prev)


def _located(done: dict, out: Path) -> dict:
    """A finished round's state with its paths inside the run folder, wherever it first ran."""
    located = dict(done)
    for key in ("lora", "refl_run", "compare", "pairs", "critic", "previous_critic", "heldout_tuned",
                "heldout_start"):
        if located.get(key) and not Path(located[key]).is_absolute():
            located[key] = str(out.parent / located[key])
    return located


def _pipeline(demo, lora: str | None):
    """The demo's feed sampler (its base model's family's: DDIM on a UNet, flow Euler on a flow model; fp32,
    the CPU unless a GPU is there) for the demo config `demo`'s base or base + `lora`."""
    from refl.generate import load_pipeline
    from toyworld.demo.config import fitting_scheduler

    return load_pipeline(demo.sd_model, lora, scheduler=fitting_scheduler(demo))


def _split_slots(guidance: list[float], base_share: float) -> tuple[list[int], list[int]]:
    """The feed slots the base draws and those the tuned model draws: round(base_share x n) base slots spread
    evenly over the list (so both models draw across the guidance scales)."""
    n = len(guidance)
    n_base = int(round(base_share * n))
    base = sorted({int(np.floor(k * n / n_base)) for k in range(n_base)}) if n_base else []
    return base, [j for j in range(n) if j not in base]


def _feed(loop: _Loop, seed: int, r: int, prev: dict, out: Path) -> dict:
    """Round r's feed: fresh prompts, `base_share` of each prompt's slots drawn by the base into feed/base,
    the rest by round r-1's tuned model into feed/model (the same seeds for both, so a prompt's base and
    tuned images share their noise slot by slot). Reused while its settings and the LoRA are unchanged."""
    from refl.feed import write_feed
    from toyworld.demo.config import feed_guidance_scales, fitting_scheduler
    from toyworld.demo.stages import enter_stage, finish_stage

    demo = loop.dcfg
    folder = out / "feed"
    guidance = feed_guidance_scales(demo)
    base_slots, model_slots = _split_slots(guidance, loop.cfg.base_share)
    feed_seed = 1_000_000 * demo.seed + ROUND_SEED * r
    settings = {"prompts": loop.prompts[r], "guidance": guidance, "base_slots": base_slots,
                "steps": demo.num_inference_steps, "seed": feed_seed}
    done = enter_stage(folder, folder / "feed.json", settings,
                       {"sd_model": demo.sd_model, "lora": prev["lora"]})
    if done is not None:
        return done
    parts = {}
    for part, slots, lora in (("base", base_slots, None), ("model", model_slots, prev["lora"])):
        if not slots:
            continue
        write_feed(_pipeline(demo, lora), loop.prompts[r], folder / part,
                   [guidance[j] for j in slots], seed=feed_seed, num_inference_steps=demo.num_inference_steps,
                   batch_size=64, drawn_by={"model": demo.sd_model, "lora": lora or "",
                                            "scheduler": fitting_scheduler(demo)})
        parts[part] = {"slots": slots, "guidance_scales": [guidance[j] for j in slots]}
    return finish_stage(folder / "feed.json", {"parts": parts, "n_prompts": len(loop.prompts[r])})


def _feedback(loop: _Loop, r: int, feed: dict, out: Path) -> dict:
    """The community on round r's feed (every prompt's base and tuned images together, in slot order): pairs
    over the feed's own image files, and which model's image won the pairs that cross models."""
    from refl.feed import image_slot, read_feed
    from toyworld.community import build_pairs_with_stats
    from toyworld.demo.stages import enter_stage, finish_stage

    demo = loop.dcfg
    feed_dir = out.parent / "feed"
    settings = {"n_users": demo.community.n_users, "behaviour": vars(demo.community.behaviour),
                "seed": demo.seed + r}
    done = enter_stage(out, out / "feedback.json", settings, {"feed": str(feed_dir)})
    if done is not None:
        return done
    by_prompt: dict[str, dict[int, str]] = {}
    model_of: dict[str, str] = {}
    for part, info in feed["parts"].items():
        for row in read_feed(feed_dir / part).itertuples():
            slot = info["slots"][image_slot(row.image)]  # the slot in the part -> the slot in the feed
            by_prompt.setdefault(row.prompt, {})[slot] = row.image
            model_of[row.image] = part
    images = {p: [slots[j] for j in sorted(slots)] for p, slots in by_prompt.items()}
    result = build_pairs_with_stats(images, demo.community.n_users, demo.seed + r, out,
                                    config=demo.community.behaviour)
    pairs = pd.read_parquet(result.parquet)
    sides = [(model_of[str((out / a).resolve())], model_of[str((out / b).resolve())])
             for a, b in zip(pairs["pos_path"], pairs["neg_path"])]
    cross = [pos for pos, neg in sides if pos != neg]
    return finish_stage(out / "feedback.json", {
        "community": result.summary(), "n_cross_model_pairs": len(cross),
        "tuned_won_cross_model": (sum(p == "model" for p in cross) / len(cross)) if cross else None})


def _critic(loop: _Loop, seed: int, r: int, prev: dict, out: Path) -> str:
    """Round r's critic: the demo's recipe (critic.train.seed + seed) from round r-1's critic (or afresh,
    `critic_start`) on the window's pairs, each round's file copied into critic_data/ with its paths rewritten
    (their images stay put)."""
    from reward.train import train
    from toyworld.critic_vs_oracle import subset_pairs
    from toyworld.demo.config import critic_config
    from toyworld.demo.layout import community_pairs_file
    from toyworld.demo.stages import enter_stage, finish_stage, trainer_settings

    n = loop.cfg.n_feedback_rounds
    window = range(r + 1) if not n else range(max(0, r + 1 - n), r + 1)
    data = out / "critic_data"
    sources = {k: (community_pairs_file(loop.demo.folder) if k == 0 else
                   _seed_dir(loop, seed, k) / "feedback" / "pairs.parquet") for k in window}
    for k, src in sources.items():
        if not (data / f"round-{k}.parquet").is_file():
            subset_pairs(src, 1.0, 0, data / f"round-{k}.parquet")
    folder = out / "critic"
    exp = critic_config(loop.dcfg, data, folder)
    init_from = prev["critic"] if loop.cfg.critic_start == "previous" else ""
    exp = replace(exp, train=replace(exp.train, seed=exp.train.seed + seed, init_from=init_from))
    inputs = {f"pairs_round_{k}": str(src) for k, src in sources.items()}
    if enter_stage(folder, folder / "critic.json", trainer_settings(exp),
                   {**inputs, **({"init_from": init_from} if init_from else {})}) is None:
        train(exp)
        finish_stage(folder / "critic.json", {"critic": str(folder / "critic"), "rounds": list(window)})
    return str(folder / "critic")


def _refl(loop: _Loop, seed: int, r: int, prev: dict, critic: str, out: Path) -> tuple[dict, dict]:
    """Every setting's ReFL run from the round's start against the round's critic, then the rule's choice;
    the chosen update's LoRA is copied to out/lora. Returns (the choice, setting -> run folder)."""
    from refl.sweep import NoAdmissibleUpdate, choose
    from runkit.logs import read_metrics
    from toyworld.demo.stages import stage_refl
    from toyworld.rule import rule_for
    from toyworld.world import split_prompts

    start = prev["lora"] if loop.cfg.refl_start == "previous" else ""
    runs = {}
    for name, overrides in loop.settings.items():
        dcfg = override(loop.dcfg, overrides + [f"refl.train.seed={seed}"])
        t = dcfg.refl.train
        dcfg = replace(dcfg, refl=replace(dcfg.refl, train=replace(
            t, init_from=start, checkpoint_every=t.validate_every, checkpoints_keep=0)))
        folder = out / "refl" / slug(name)
        logger.info("flywheel: seed %d, round %d, ReFL %s in %s", seed, r, name, folder)
        stage_refl(dcfg, critic, split_prompts(seed=0)[0], folder)
        runs[name] = folder
    rule = rule_for(loop.demo.cfg.clip_model)
    reference = prev["base_validation"] if loop.cfg.hold_reference == "base" else None
    records = {name: read_metrics(folder / "metrics.jsonl") for name, folder in runs.items()}
    try:
        picked = choose(records, rule, reference)
        chosen = {"setting": picked["run"], "update": picked["update"], "admissible": True}
    except NoAdmissibleUpdate:
        # every run starts beyond the reference: the deployed model stays (update 0 of any run is its start)
        chosen = {"setting": next(iter(runs)), "update": 0, "admissible": False}
    _keep_lora(loop, runs[chosen["setting"]], chosen["update"], start, out / "lora")
    return chosen, runs


def _keep_lora(loop: _Loop, run: Path, update: int, start: str, dest: Path) -> None:
    """The LoRA of `run` at `update` copied to `dest`: its checkpoint's, its start's at update 0 (the base's
    no-op LoRA when it started fresh)."""
    from runkit.checkpoints import checkpoint_name

    if dest.exists():
        shutil.rmtree(dest)
    if update > 0:
        source = run / "checkpoints" / checkpoint_name(update) / "lora"
        shutil.copytree(source if source.is_dir() else run / "lora", dest)
    elif start:
        shutil.copytree(start, dest)
    else:
        from refl.components import load_components
        from refl.lora import add_lora, save_lora

        components = load_components(loop.dcfg.sd_model)
        add_lora(components, loop.dcfg.refl.lora)  # B starts at zero: the base, exactly
        save_lora(components, dest)


def _heldout(loop: _Loop, lora: str, out: Path) -> Path:
    """Held-out oracle pairs of base + `lora`: the demo's held-out prompts for the critic, drawn at the demo's
    settings (the same seeds for every model); returns the pairs file. Reused while the LoRA is unchanged."""
    from refl.feed import draw_feed
    from toyworld.community import write_oracle_pairs
    from toyworld.demo.stages import enter_stage, finish_stage
    from toyworld.world import heldout_prompts

    demo = loop.dcfg
    c = demo.community
    prompts = heldout_prompts("oracle_pairs", c.n_oracle_pair_prompts)
    settings = {"prompts": prompts, "n": c.oracle_images_per_prompt, "guidance": demo.guidance_scale,
                "steps": demo.num_inference_steps, "seed": 1_000_000 * demo.seed + HELDOUT_SEED}
    done = enter_stage(out, out / "heldout.json", settings, {"sd_model": demo.sd_model, "lora": lora})
    if done is None:
        images = draw_feed(_pipeline(demo, lora), prompts, [demo.guidance_scale],
                           n_seeds=c.oracle_images_per_prompt, seed=settings["seed"],
                           num_inference_steps=demo.num_inference_steps, batch_size=64)  # (P, n, H, W, 3)
        write_oracle_pairs(images, prompts, out)
        finish_stage(out / "heldout.json", {"pairs": str(out / "pairs.parquet")})
    return out / "pairs.parquet"


def _compare(loop: _Loop, critic: str, lora: str, out: Path) -> dict:
    """The demo's comparison of base + `lora` (its held-out prompts, samples and judges; base samples copied
    from the demo), the round's critic as the selector."""
    from evaluation.harness import run_compare
    from toyworld.demo.config import compare_config
    from toyworld.variants import copy_base_samples

    copy_base_samples(loop.demo.folder, out)
    # Neither best-of-n on the tuned model nor the sampler's throughput is read here: not drawn.
    ccfg = replace(compare_config(loop.dcfg, critic, lora, loop.demo.prompts_file, out),
                   tuned_best_of=False, benchmark_throughput=False)
    return run_compare(ccfg)


def _measure(loop: _Loop, seed: int, out: Path, state: dict, results: dict, records: list[dict], chosen: dict,
             previous: dict | None = None) -> dict:
    """A round's numbers beside its state, written as out/round.json: critics against the oracle on held-out
    pairs of the base's, the round's start model's and its tuned model's samples; ReFL minus base per judge
    and oracle term (toyworld.study's per-seed numbers), the gain over the previous round, the win rate; the
    over-optimisation analysis of the chosen run (drawn into out/overoptimisation.png)."""
    import reward
    from evaluation.arms import arm_name
    from evaluation.report import short_name
    from evaluation.stats import mean_ci
    from reward.data import load_pairs
    from toyworld.critic_vs_oracle import accuracy_vs_oracle, pair_gaps
    from toyworld.demo.analysis import oracle_breakdown
    from toyworld.demo.stages import finish_stage
    from toyworld.evaluators import JUDGE_LABELS
    from toyworld.overoptimisation import analyse, plot
    from toyworld.study import _judge_seed

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    state["heldout_tuned"] = str(_heldout(loop, state["lora"], out / "heldout"))
    sets = {"base": (loop.base_truth, loop.base_gaps)}
    for name, path in (("start", state.get("heldout_start")), ("tuned", state["heldout_tuned"])):
        if path:
            truth = load_pairs(path)
            sets[name] = (truth, pair_gaps(truth))
    accuracy = {}
    for who in ("critic", "previous_critic"):
        model = reward.load(state[who])
        accuracy[who] = {name: _accuracy(accuracy_vs_oracle(model, *truth_gaps))
                         for name, truth_gaps in sets.items()}
    numbers = _judge_seed(results, oracle_breakdown(Path(state["compare"]), results))
    # Judges by their role: the selector is the reward ReFL climbed (each round's own critic).
    labels = {results["selector"]: REWARD, **JUDGE_LABELS}
    name = {spec: short_name(spec, labels) for spec in results["evaluators"]}
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    tuned = np.asarray(results["arms"][arm_name("refl")]["per_prompt"][oracle])  # (P,)
    before = (np.asarray(previous["tuned_per_prompt"]) if previous is not None
              else np.asarray(results["arms"][arm_name("base")]["per_prompt"][oracle]))
    over = analyse(records, loop.demo.cfg.clip_model)
    if over is not None:
        plot(records, over, loop.demo.cfg.clip_model, out / "overoptimisation.png")
        over["loop_pick"] = _pick_on_curve(records, chosen["update"])
    state.setdefault("timings", {})["measure_s"] = time.perf_counter() - t0
    summary = {**state, "seed": seed, "chosen": chosen, "critic_vs_oracle": accuracy,
               "judges": {name[k]: v for k, v in numbers["judges"].items()}, "terms": numbers["terms"],
               "oracle_gain_over_previous_round": mean_ci(tuned - before),
               "tuned_per_prompt": tuned.tolist(),
               "win_rate_vs_base": {name[k]: w[f"{arm_name('refl')}_vs_{arm_name('base')}"]
                                    for k, w in results["win_rates"].items()},
               "overoptimisation": over}
    finish_stage(out / "round.json", summary)
    return summary


def _accuracy(report: dict) -> dict:
    return {k: report[k] for k in ("pairwise_accuracy", "ci95", "n_pairs")}


def _pick_on_curve(records: list[dict], update: int) -> dict | None:
    """The oracle on the chosen run's validation at the loop's pick, beside its update 0 (evaluation only)."""
    from refl.sweep import validations
    from toyworld.overoptimisation import ORACLE

    rows = {int(r["update"]): r for r in validations(records)}
    if update not in rows or ORACLE not in rows[update]:
        return None
    oracle = rows[update][ORACLE]
    return {"update": update, "oracle": oracle, "from_start": oracle - rows[0][ORACLE]}

