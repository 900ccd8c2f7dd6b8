"""The demo's config: its own knobs (what ties the stages together) and the real config of each stage,
the defaults the demo trains with, the quick settings, and each stage's config as the demo fills it in."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from evaluation.config import CompareConfig
from refl.config import ReflConfig, ReflTrainConfig
from refl.step import StepConfig
from reward.config import CriticDataConfig, CriticTrainConfig, RewardConfig
from reward.model import CriticConfig
from runkit.config import ConfigError
from toyworld.community import BehaviourConfig
from toyworld.world import ASSETS

# The shipped toy SD and toy CLIP (and the toy flow model once it is made).
# The shipped base models by short name (`sd_model: toy-flow`): each a folder in ASSETS and the command
# that makes it there.
SHIPPED_MODELS = {"toy-sd": "social-refl-pretrain-toy-sd", "toy-flow": "social-refl-pretrain-toy-flow"}


def shipped_model(name: str) -> str:
    """`name` itself, or the folder in ASSETS that a shipped model's short name stands for (a short name wins
    over a folder of that name in the working directory, as refl.components' presets do). A missing shipped
    folder is a ConfigError naming the command that makes it."""
    if name not in SHIPPED_MODELS:
        return name
    folder = ASSETS / name
    if not (folder / "model_index.json").is_file():
        raise ConfigError(f"sd_model={name}: {folder} is not there yet; make it with "
                          f"`{SHIPPED_MODELS[name]} --out {folder}`")
    return str(folder)


def _demo_critic() -> RewardConfig:
    # Trains only the upper vision blocks: on ~2k community pairs that agree ~65% with the taste, training
    # the text tower too (the paper's mode) fitted the training prompts and, in exploratory runs, lost ~5
    # points against the oracle on held-out prompts (try it: --set critic.model.training_mode=all).
    # Not train.keep_best: the community's own held-out validation (~300 pairs) barely moves while the critic
    # trains, so the checkpoint it keeps is close to a random pick; the critic study (docs/results.md, "The
    # critic's learning curve over seeds") found it 4 to 13 points below the final critic against the
    # oracle. The final critic is what a user of this recipe gets; choosing by that study's oracle numbers
    # would not be, so the recipe is not tuned on them.
    return RewardConfig(
        model=CriticConfig(model_name="toy-clip", training_mode="visual_upper_layers"),
        data=CriticDataConfig(val_fraction=0.1),
        # resume latest: an interrupted critic stage continues its own checkpoints (its key excludes resume).
        train=CriticTrainConfig(epochs=3, batch_size=32, lr=1e-4, lr_schedule="cosine", warmup_updates=10,
                                resume="latest"))


def _demo_refl() -> ReflConfig:
    # The settings the sweep rule chose (social-refl-refl-sweep, toyworld/rule.py; docs/results.md, "ReFL's
    # settings, by a rule written before the sweep"): of learning rates 3e-4, 1e-3, 3e-3 with guidance 4 or 1
    # in training, 120 updates each, the highest reward on the validation prompts that kept the zero-shot CLIP
    # within 1 point and fidelity within 5 points of the base was lr 3e-4 with guidance 4 at update 20, on the
    # validation prompts drawn at random (toyworld.world.heldout_prompts; on the earlier alphabetical slice it
    # was lr 3e-4 without guidance at update 20). The schedule is constant, so these 20 updates are the sweep
    # run's first 20.
    return ReflConfig(
        # grad_scale 1 (not ImageReward's 1e-3 next to a full-UNet lr of 1e-5): Adam normalises the overall
        # scale, so what matters here is the reward's balance with the regulariser.
        step=StepConfig(method="refl", num_inference_steps=20, cut_range=[14, 19], reg_weight=1.0,
                        grad_scale=1.0,
                        # Rollouts at the demo's sampling guidance: the sweep's choice.
                        guidance_scale=4.0),
        train=ReflTrainConfig(max_updates=20, batch_size=8, gradient_accumulation=1, lr=3e-4,
                              validate_every=10, checkpoint_every=10, resume="latest"))


def _demo_compare() -> CompareConfig:
    # 32 px samples shown at 160 px (5x, nearest neighbour): large enough to judge colour, size and edges.
    # ReFL's one-sample score is the mean over 16 samples per prompt (paired with base samples 0-15): the same
    # expectation as over 64, a quarter of the tuned sampling, which keeps the demo within 15 minutes.
    return CompareConfig(n_samples=64, n_tuned_samples=16, batch_size=64, seed=7, report_image_px=160)


# The community's feed: one image per entry per training prompt, drawn at that guidance scale. Real feeds mix
# settings and models (DiffusionDB records every user's own CFG, spread over roughly 1-20 around SD's default
# 7.5; Pick-a-Pic draws from several models and guidance scales), and the toy SD's samples agree with each
# other from CFG 4 up, so the feed spans the toy model's range: loose samples at 1.5-2, the demo's 4, strict
# 6.
FEED_GUIDANCE = [1.5, 2.0, 3.0, 4.0, 6.0, 1.5, 2.0, 4.0]
# The flow world's feed: the toy SD's mapped scale by scale onto the toy flow model's by within-prompt spread
# (toyworld/feed_scales.py, the rule written in docs/toyflow.md before measuring; never the oracle): its
# samples of a prompt keep closer together at the same guidance (spread 0.0115 at 4 against the toy SD's
# 0.0186), so the same looseness sits at lower scales.
FLOW_FEED_GUIDANCE = [1.25, 1.5, 2.0, 2.0, 3.0, 1.25, 1.5, 2.0]
# Each shipped model's feed, the default of community.feed_guidance_scales; any other folder: FEED_GUIDANCE.
WORLD_FEEDS = {"toy-sd": FEED_GUIDANCE, "toy-flow": FLOW_FEED_GUIDANCE}


@dataclass
class CommunityStageConfig:
    # Training prompts shown to the community.
    n_prompts: int = 240
    # The feed: the guidance scale of each image drawn per training prompt (its length is the images per
    # prompt); sampler steps are the demo's num_inference_steps. ReFL, validation and the comparison keep the
    # demo's own guidance_scale. [] = the base model's own (feed_guidance_scales: WORLD_FEEDS).
    feed_guidance_scales: list[float] = field(default_factory=list)
    # Simulated users. Sized on the third edition's feed before any ReFL ran on it: 60 users (1,945 pairs)
    # gave a critic at 59.9% against the oracle, 120 users with up to 16 pairs per prompt (3,177) 63.1%, 240
    # users (3,054; denser exposure leaves fewer negatives) 62.9%, and 480 prompts x 120 users (3,892) 62.2%:
    # the critic had stopped rising with more pairs, and 480 prompts would double the feed's drawing time.
    n_users: int = 120
    # Held-out prompts whose generations, ordered by the oracle, measure the critic.
    n_oracle_pair_prompts: int = 32
    # Images per held-out prompt, drawn as the demo samples (num_inference_steps, guidance_scale): the pairs a
    # critic is measured on are pairs of the base model's samples at the settings ReFL and the comparison use.
    oracle_images_per_prompt: int = 8
    # How the simulated users browse, judge and remix (toyworld.community.BehaviourConfig), calibrated to
    # community.REALISM on this feed before any ReFL ran on it, by the second edition's rule (the first step
    # of 0.05 down from 0.15 that meets the criteria): judgement noise 0.15 gave pairs agreeing with the
    # oracle 60.1% of the time, 0.10 65.3% with every varying term carried (480 prompts, 120 users). Up to 16
    # pairs per prompt: every remixed x not-remixed combination of 8 images when half are remixed.
    behaviour: BehaviourConfig = field(
        default_factory=lambda: BehaviourConfig(judgement_noise=0.10, max_pairs_per_prompt=16))


@dataclass
class DemoConfig:
    """The demo's own knobs plus the real config of each stage. The demo fills in what ties the stages
    together (FILLED_BY_DEMO: model paths, input and output folders, sampling settings); everything
    else in `critic`, `refl` and `compare` is the user's, e.g. --set refl.train.lr=1e-3."""
    # Keys renamed after a release: old dotted key -> new key (refused with the new name for one release).
    RENAMED: ClassVar[dict[str, str]] = {}

    # Where every stage writes (community/, critic/, refl/, samples/, report.html, summary.json).
    output_dir: str = "runs/demo"
    # Seed of the community stage (which prompts, which images); each stage config has its own seed.
    seed: int = 0
    # The base model: a diffusers directory (a UNet or a flow model) or a shipped model's short name
    # (SHIPPED_MODELS: toy-sd, the default, or toy-flow, made by social-refl-pretrain-toy-flow), resolved to
    # its folder in toyworld/assets. On a flow model the stages' samplers follow fitting_scheduler.
    sd_model: str = "toy-sd"
    # The critic's starting point and the zero-shot judge: a critic directory (default: the shipped toy CLIP).
    clip_model: str = str(ASSETS / "toy-clip")
    # Sampler steps and guidance of every image the demo draws outside the ReFL step.
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    # Held-out prompts in the comparison.
    n_compare_prompts: int = 16
    # Critics trained on the community's pairs: 1 = one critic; k > 1 trains k - 1 more members (seeds
    # critic.train.seed + 1, ...) and ReFL's reward is their ensemble (mean - refl.reward.ensemble_penalty x
    # std). The selector of best-of-N stays the first critic.
    n_critic_members: int = 1
    # The critic's learning curve: the demo's critic trained again on these fractions of the community's pairs
    # (nested random subsets) and measured like it; [] = none. Shows whether more pairs would still help.
    critic_curve: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])
    # Train the critic's ceiling too: the same recipe on oracle-ordered pairs of the community's own feed (no
    # community noise), measured on the same held-out pairs.
    critic_ceiling: bool = True
    # Held-out validation prompts for ReFL's judges (refl.train.heldout_evaluators, default: the zero-shot
    # CLIP, the oracle and prompt fidelity): a random draw of the held-out split apart from those that
    # measure the critic and the comparison (toyworld.world.heldout_prompts), so selecting by a judge never
    # sees the evaluation's prompts.
    n_validation_prompts: int = 8
    # Denoising-regulariser data: this many renders of training prompts (the world's own pre-training data,
    # as ImageReward uses its pre-training set); 0 = base-model samples (refl.data.reg_images unset).
    n_reg_renders: int = 0
    community: CommunityStageConfig = field(default_factory=CommunityStageConfig)
    critic: RewardConfig = field(default_factory=_demo_critic)  # reward/ trainer config
    refl: ReflConfig = field(default_factory=_demo_refl)  # refl/ trainer config
    compare: CompareConfig = field(default_factory=_demo_compare)  # the best-of-N harness config

    def __post_init__(self):
        # The folder, not the short name, in every stage's config and key: the default's keys stay those
        # of the toy SD's folder path.
        self.sd_model = shipped_model(self.sd_model)
        defaults = {"critic": _demo_critic(), "refl": _demo_refl(), "compare": _demo_compare()}
        for stage, keys in FILLED_BY_DEMO.items():
            for key in keys:
                if _get(getattr(self, stage), key) != _get(defaults[stage], key):
                    raise ConfigError(f"{stage}.{key} is set by the demo ({FILLED_BY_DEMO_WHY[stage]}); "
                                      "change the demo's own keys instead")
        # Each count draws from its own share of the held-out prompts: refused here, not after the stages
        # before the one that draws it.
        from toyworld.world import heldout_prompts

        counts = (("community.n_oracle_pair_prompts", "oracle_pairs", self.community.n_oracle_pair_prompts),
                  ("n_compare_prompts", "compare", self.n_compare_prompts),
                  ("n_validation_prompts", "validation", self.n_validation_prompts))
        for key, use, n in counts:
            try:
                heldout_prompts(use, n)
            except ValueError as err:
                raise ConfigError(f"{key}={n}: {err}") from None


# Fields of the stage configs the demo sets from its own keys and from the stages before.
FILLED_BY_DEMO = {
    "critic": ["model.pretrained", "data.train", "train.output_dir"],
    "refl": ["model.name", "reward.critic", "data.prompts_file", "data.reg_images", "data.reg_pool_size",
             "train.output_dir", "train.validation_num_inference_steps", "train.validation_guidance_scale",
             "train.validation_prompts"],
    "compare": ["model.name", "lora", "prompts_file", "num_inference_steps", "guidance_scale", "critic",
                "evaluators", "output_dir"],
}
FILLED_BY_DEMO_WHY = {
    "critic": "clip_model, the community's pairs, output_dir/critic",
    "refl": "sd_model, the trained critic(s), the training prompts, n_reg_renders, output_dir/refl, "
            "num_inference_steps, guidance_scale, n_validation_prompts",
    "compare": "sd_model, the ReFL LoRA, n_compare_prompts, num_inference_steps, guidance_scale, the critic, "
               "clip_model, output_dir",
}


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


QUICK = {
    "community.n_prompts": 48, "community.feed_guidance_scales": [1.5, 2.0, 4.0, 6.0, 1.5, 4.0],
    "community.n_users": 20,
    "community.n_oracle_pair_prompts": 12, "community.oracle_images_per_prompt": 6, "critic_curve": [0.5],
    "critic.train.epochs": 2, "refl.train.max_updates": 6,
    "refl.train.batch_size": 4, "refl.train.validate_every": 2, "refl.train.checkpoint_every": 2,
    "refl.step.num_inference_steps": 10, "refl.step.cut_range": [6, 9], "num_inference_steps": 10,
    "n_compare_prompts": 4,
    "compare.n_tuned_samples": 0, "compare.n_samples": 8, "compare.batch_size": 8, "n_validation_prompts": 4,
}


def critic_config(cfg: DemoConfig, pairs: str | Path, out: Path) -> RewardConfig:
    """The demo's critic config with the fields the demo fills."""
    return replace(cfg.critic, model=replace(cfg.critic.model, pretrained=cfg.clip_model),
                   data=replace(cfg.critic.data, train=str(pairs)),
                   train=replace(cfg.critic.train, output_dir=str(out)))


def feed_guidance_scales(cfg: DemoConfig) -> list[float]:
    """The community feed's scales: `community.feed_guidance_scales` as set, or for [] the base model's own
    (WORLD_FEEDS by the shipped folder `sd_model` names; FEED_GUIDANCE for any other). Read here, not filled
    into the config: a config's defaults are built before `--set sd_model=...` applies."""
    if cfg.community.feed_guidance_scales:
        return list(cfg.community.feed_guidance_scales)
    model = Path(cfg.sd_model).resolve()
    short = next((name for name in WORLD_FEEDS if model == (ASSETS / name).resolve()), None)
    return list(WORLD_FEEDS.get(short, FEED_GUIDANCE))


def fitting_scheduler(cfg: DemoConfig, scheduler: str | None = None) -> str:
    """A stage's sampler as it reads on the demo's base model: itself where it fits the model's family, else
    the family's own kind (the defaults' DDIM becomes the flow Euler sampler on a flow model, which has no
    DDIM), so `sd_model` alone switches the demo between a UNet and a flow model. None: the family's own
    (DDIM on a UNet), the sampler of what no config names one for: the community's feed, the held-out
    draws, and the flywheel's feeds. Every study reads its samplers here."""
    from refl.components import family_of
    from refl.sampling import family_scheduler

    family = family_of(cfg.sd_model)
    return family_scheduler(family) if scheduler is None else family_scheduler(family, scheduler)


def refl_config(cfg: DemoConfig, critic: str | list[str], prompts_file: Path, out: Path,
                reg_table: Path | None) -> ReflConfig:
    """The demo's ReFL config with the fields the demo fills."""
    from toyworld.world import heldout_prompts

    r = cfg.refl
    r = replace(r, step=replace(r.step, scheduler=fitting_scheduler(cfg, r.step.scheduler)))
    data = replace(r.data, prompts_file=str(prompts_file))
    if reg_table is not None:
        data = replace(data, reg_images=str(reg_table), reg_pool_size=cfg.n_reg_renders)
    judges = r.train.heldout_evaluators or [f"clip:{cfg.clip_model}", "oracle:", "fidelity:"]
    train = replace(r.train, output_dir=str(out), validation_num_inference_steps=cfg.num_inference_steps,
                    validation_guidance_scale=cfg.guidance_scale, heldout_evaluators=judges,
                    validation_prompts=heldout_prompts("validation", cfg.n_validation_prompts))
    return replace(r, model=replace(r.model, name=cfg.sd_model), reward=replace(r.reward, critic=critic),
                   data=data, train=train)


def compare_config(cfg: DemoConfig, critic: str, lora: str, prompts_file: Path, out: Path,
                   evaluators: list[str] | None = None) -> CompareConfig:
    """The demo's comparison config with the fields the demo fills."""
    c = replace(cfg.compare, scheduler=fitting_scheduler(cfg, cfg.compare.scheduler))
    return replace(c, model=replace(c.model, name=cfg.sd_model), lora=lora, prompts_file=str(prompts_file),
                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   critic=critic,
                   evaluators=evaluators if evaluators is not None else [f"clip:{cfg.clip_model}", "oracle:",
                                                                         "fidelity:"],
                   output_dir=str(out))
