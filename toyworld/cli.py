"""Command-line entry points of `toyworld`: the demo, the studies on a finished demo, and the scripts that
make the world's shipped models and data (the console scripts call these; runkit.cli gives
every command its error convention)."""

from __future__ import annotations

import json
import logging

from runkit.cli import command
from runkit.config import config_parser, parse_config_args


def setup_logging() -> None:
    """The project's format; open_clip and diffusers log through the root logger at INFO, so the screen keeps
    to the project's own lines."""
    from runkit.logs import setup_logging as setup

    setup(level=logging.WARNING)
    for name in ("runkit", "reward", "refl", "evaluation", "toyworld"):
        logging.getLogger(name).setLevel(logging.INFO)


@command
def demo_main(argv: list[str] | None = None) -> int:
    """The default run on the toy world: community data -> critic -> ReFL -> best-of-64 comparison -> report.

        social-refl-demo --out runs/demo            # about 15 minutes on a 2-core CPU
        social-refl-demo --out runs/demo-quick --quick
        social-refl-demo --out runs/demo-flow --set sd_model=toy-flow   # on the toy flow model
    Rerunning with the same --out resumes: finished stages are reused.
    """
    from toyworld.demo import QUICK, STAGES, DemoConfig, format_summary, run_demo

    parser = config_parser(DemoConfig, demo_main.__doc__, flags=("output_dir", "seed"))
    parser.add_argument("--quick", action="store_true",
                        help="a small run (about 3 minutes) for smoke tests: QUICK's settings, under --set")
    parser.add_argument("--until", default="compare", choices=list(STAGES),
                        help="stop after this stage (e.g. community: look at the feedback before training on "
                             "it)")
    known, _ = parser.parse_known_args(argv)
    # JSON values are YAML too, so the quick settings parse exactly as written there.
    quick = [f"{k}={json.dumps(v)}" for k, v in QUICK.items()] if known.quick else []
    cfg, args = parse_config_args(parser, argv, first=quick)
    setup_logging()
    print(format_summary(run_demo(cfg, args.until)))
    return 0


@command
def make_pairs_main(argv: list[str] | None = None) -> int:
    """Write a toy-world Social Reward pairs dataset: OUT/train/pairs.parquet and OUT/heldout/pairs.parquet.

    Candidates are renders of varied quality (a generator's stand-in); a simulated community remixes
    some of them; remixed vs seen-but-not-remixed images under one prompt become pairs. Prints a JSON
    summary with the pair counts and how often the hidden taste (the oracle) agrees with each pair.

        social-refl-make-toy-pairs --out runs/toy_pairs
        social-refl-make-toy-pairs --set n_train_prompts=200 --set behaviour.judgement_noise=0.1
    """
    from runkit.logs import setup_logging as setup
    from toyworld.community import ToyPairsConfig, make_toy_pairs

    cfg, _ = parse_config_args(config_parser(ToyPairsConfig, make_pairs_main.__doc__,
                                             flags=("output_dir", "seed")), argv)
    setup()
    print(json.dumps(make_toy_pairs(cfg), indent=2))
    return 0


def _pretrain(argv, doc: str, config_cls, run) -> dict:
    """The two pre-training commands: a config, the torch CPU thread count, the run; returns its report."""
    import torch

    from runkit.logs import setup_logging as setup

    cfg, _ = parse_config_args(config_parser(config_cls, doc, flags=("output_dir", "seed", "threads")), argv)
    setup()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return run(cfg)


@command
def pretrain_sd_main(argv: list[str] | None = None) -> int:
    """Pre-train the toy world's tiny Stable Diffusion and save it as a diffusers directory (see
    toyworld/pretrain_sd.py). Reproduces `toyworld/assets/toy-sd` from its seed:

        social-refl-pretrain-toy-sd --out toyworld/assets/toy-sd
    """
    from toyworld.pretrain_sd import PretrainSDConfig, pretrain_toy_sd

    print(json.dumps(_pretrain(argv, pretrain_sd_main.__doc__, PretrainSDConfig, pretrain_toy_sd), indent=2))
    return 0


@command
def pretrain_flow_main(argv: list[str] | None = None) -> int:
    """Pre-train the toy world's flow-matching model (an SD 3 transformer on the toy SD's VAE and text
    encoder) and save it as a diffusers StableDiffusion3Pipeline directory (see toyworld/pretrain_flow.py):

        social-refl-pretrain-toy-flow --out toyworld/assets/toy-flow   # the demo's sd_model=toy-flow
        social-refl-pretrain-toy-flow --out runs/flow-smoke --set n_images=128 --set transformer_updates=3
    """
    from toyworld.pretrain_flow import PretrainFlowConfig, pretrain_toy_flow

    print(json.dumps(_pretrain(argv, pretrain_flow_main.__doc__, PretrainFlowConfig, pretrain_toy_flow),
                     indent=2))
    return 0


@command
def feed_scales_main(argv: list[str] | None = None) -> int:
    """The community feed's guidance scales for another world model (toyworld/feed_scales.py): both models'
    prompt fidelity and within-prompt spread per candidate scale, and the toy SD's feed mapped scale by scale
    to the other model's by spread (never the oracle). Writes <out>/feed_scales.json.

        social-refl-world-feed-scales --out runs/feed-scales        # toy-sd's feed mapped onto toy-flow
    """
    from toyworld.feed_scales import FeedScalesConfig, feed_scales_markdown, run_feed_scales

    cfg, _ = parse_config_args(config_parser(FeedScalesConfig, feed_scales_main.__doc__,
                                             flags=("output_dir", "model")), argv)
    setup_logging()
    print(feed_scales_markdown(run_feed_scales(cfg)))
    return 0


@command
def pretrain_clip_main(argv: list[str] | None = None) -> int:
    """Pre-train the toy world's tiny CLIP and ship it as toyworld/assets/toy-clip (fp16).

        social-refl-pretrain-toy-clip                     # reproduces the shipped asset
        social-refl-pretrain-toy-clip --set max_updates=100 --out runs/clip-smoke
    """
    from toyworld.pretrain_clip import PretrainClipConfig, pretrain_toy_clip

    report = _pretrain(argv, pretrain_clip_main.__doc__, PretrainClipConfig, pretrain_toy_clip)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    return 0


@command
def ablation_main(argv: list[str] | None = None) -> int:
    """ReFL variants on a finished demo (same critic, prompts and seeds), each judged against the hidden
    taste: the change from base in the critic, the oracle, each oracle term and prompt fidelity.
    Writes <demo>/ablation/ablation.json and ablation.md and prints the table. Finished variants are reused.

        social-refl-ablation --demo runs/demo                 # the regulariser study (~20 min, 2 cores)
        social-refl-ablation --demo runs/demo --variants "kl 1: refl.step.kl_weight=1" \\
            "longer: refl.train.max_updates=240"
    """
    from toyworld.ablation import AblationConfig, ablation_markdown, run_ablation
    from toyworld.variants import parse_variant

    cfg, _ = parse_config_args(config_parser(AblationConfig, ablation_main.__doc__, flags=(
        "demo", "variants", "n_prompts", "n_samples")), argv)
    setup_logging()
    variants = dict(parse_variant(v) for v in cfg.variants) or None
    print(ablation_markdown(run_ablation(cfg.demo, variants, cfg.n_prompts, cfg.n_samples)))
    return 0


@command
def study_main(argv: list[str] | None = None) -> int:
    """ReFL variants with several training seeds on a finished demo, against base and base best-of-N, judged
    by the critic, the zero-shot CLIP, the oracle, each oracle term and prompt fidelity: the mean and the
    spread across seeds beside each seed's per-prompt intervals. Writes <demo>/study/<study>.json and .md.

        social-refl-world-study --demo runs/demo                  # plain ReFL, seeds 0 1 2 (0 = the demo's
        run) social-refl-world-study --demo runs/demo --study guard    # ReFL against the hacking guards
        social-refl-world-study --demo runs/demo --seeds 0 1 2 3 social-refl-world-study --demo runs/demo
        --study critic   # the critic's learning curve over seeds
    """  # noqa: E501
    from toyworld.study import StudyConfig, run_study, study_markdown

    parser = config_parser(StudyConfig, study_main.__doc__, flags=("demo", "study", "seeds"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    if cfg.study == "critic":
        from toyworld.critic_study import critic_study_markdown, run_critic_study

        print(critic_study_markdown(run_critic_study(cfg.demo, cfg.seeds)))
        return 0
    print(study_markdown(run_study(cfg.demo, cfg.seeds, study=cfg.study)))
    return 0


@command
def sweep_main(argv: list[str] | None = None) -> int:
    """Choose the toy world's ReFL settings by the sweep rule (toyworld/sweep.py) on a demo's critic.

    Trains each setting of the grid with validation from update 0 on the demo's validation prompts, then
    keeps the highest reward among updates that hold the zero-shot CLIP and prompt fidelity near the base.
    Needs the demo's community and critic stages (`--until critic` is enough).

        social-refl-refl-sweep --demo runs/demo
    """
    from toyworld.sweep import SweepConfig, run_sweep, sweep_markdown

    cfg, _ = parse_config_args(config_parser(SweepConfig, sweep_main.__doc__, flags=("demo",)), argv)
    setup_logging()
    print(sweep_markdown(run_sweep(cfg.demo)))
    return 0


@command
def flywheel_main(argv: list[str] | None = None) -> int:
    """The flywheel on a finished demo (round 0): each round draws a feed from the previous round's tuned
    model (half of it from the base), the same simulated community judges it, the critic continues from the
    previous one on all the feedback, ReFL continues from the previous LoRA with settings chosen by the sweep
    rule on the validation prompts; every round is judged against the oracle. Writes <demo>/flywheel/: one
    folder per seed and round, flywheel.json, flywheel.md (the rounds table) and flywheel.png. Finished rounds
    are reused.

        social-refl-world-flywheel --demo runs/demo                  # 3 rounds, seeds 0 1 2
        social-refl-world-flywheel --demo runs/demo-quick --quick    # 2 short rounds, seed 0
        social-refl-world-flywheel --demo runs/demo --set base_share=0 --seeds 0
    """
    from toyworld.flywheel import QUICK, FlywheelConfig, run_flywheel
    from toyworld.flywheel_report import flywheel_markdown

    parser = config_parser(FlywheelConfig, flywheel_main.__doc__, flags=("demo", "n_rounds", "seeds"))
    parser.add_argument("--quick", action="store_true",
                        help="a small loop for smoke tests (QUICK's settings, under --set): 2 rounds, seed 0")
    known, _ = parser.parse_known_args(argv)
    quick = [f"{k}={json.dumps(v)}" for k, v in QUICK.items()] if known.quick else []
    cfg, _ = parse_config_args(parser, argv, first=quick)
    setup_logging()
    print(flywheel_markdown(run_flywheel(cfg)))
    return 0


@command
def arms_main(argv: list[str] | None = None) -> int:
    """Critic and ReFL, or tuning on the feedback itself? On a finished demo: DPO on the community's pairs and
    KTO on its per-image likes (remixed or not), each one's beta and learning rate chosen by the rule written
    before the sweep (toyworld/rule.py: the critic, the zero-shot CLIP and prompt fidelity on the validation
    prompts; never the oracle), then with each training seed base, best-of-N by the critic, ReFL, DPO, KTO
    and ReFL with best-of-M on the oracle and its terms, prompt fidelity, the zero-shot CLIP, the oracle win
    rate against base and the cost. Writes <demo>/arms/arms.json and arms.md (and a report per seed in
    <demo>/arms/compare/seed-N/); finished runs are reused. Rerun social-refl-demo on the folder to show the
    table in its report.html.

        social-refl-world-arms --demo runs/demo                 # the full study (docs/preference.md)
        social-refl-world-arms --demo runs/demo-quick --quick   # CI's small grid on a quick demo
    """
    from toyworld.arms import ArmsConfig, arms_markdown, run_arms

    cfg, _ = parse_config_args(config_parser(ArmsConfig, arms_main.__doc__, flags=("demo", "seeds", "quick")),
                               argv)
    setup_logging()
    print(arms_markdown(run_arms(cfg.demo, cfg.seeds, quick=cfg.quick)))
    return 0
