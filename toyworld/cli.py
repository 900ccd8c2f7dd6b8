"""Command-line entry points of `toyworld`: the demo, the studies on a finished demo, and the scripts that
make the world's shipped models and data (scripts/ and the console scripts wrap these; runkit.cli gives
every command its error convention)."""

from __future__ import annotations

import argparse
import json
import logging

from runkit.cli import command
from runkit.config import add_config_args, load_config


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
    Rerunning with the same --out resumes: finished stages are reused.
    """
    from dataclasses import replace

    from toyworld.demo import QUICK, STAGES, DemoConfig, format_summary, run_demo

    parser = argparse.ArgumentParser(description=demo_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (report.html lands here)")
    parser.add_argument("--quick", action="store_true", help="a small run (about 3 minutes) for smoke tests")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DemoConfig field, e.g. --set refl.train.max_updates=30")
    parser.add_argument("--until", default="compare", choices=list(STAGES),
                        help="stop after this stage (e.g. community: look at the feedback before training on "
                             "it)")
    args = parser.parse_args(argv)
    setup_logging()
    # JSON values are YAML too, so the quick settings parse exactly as written there.
    base = [f"{k}={json.dumps(v)}" for k, v in QUICK.items()] if args.quick else []
    cfg = replace(load_config(DemoConfig, None, base + list(args.overrides)), output_dir=str(args.out))
    print(format_summary(run_demo(cfg, args.until)))
    return 0


@command
def make_pairs_main(argv: list[str] | None = None) -> int:
    """Write a toy-world Social Reward pairs dataset: OUT/train/pairs.parquet and OUT/heldout/pairs.parquet.

    Candidates are renders of varied quality (a generator's stand-in); a simulated community remixes
    some of them; remixed vs seen-but-not-remixed images under one prompt become pairs. Prints a JSON
    summary with the pair counts and how often the hidden taste (the oracle) agrees with each pair.

        social-refl-make-toy-pairs --set output_dir=runs/toy_pairs
        social-refl-make-toy-pairs --set n_train_prompts=200 --set behaviour.judgement_noise=0.1
    """
    from runkit.logs import setup_logging as setup
    from toyworld.community import ToyPairsConfig, make_toy_pairs

    parser = argparse.ArgumentParser(description=make_pairs_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    args = parser.parse_args(argv)
    setup()
    print(json.dumps(make_toy_pairs(load_config(ToyPairsConfig, args.config, args.overrides)), indent=2))
    return 0


def _pretrain(argv, doc: str, config_cls, run, threads: int, threads_help: str) -> dict:
    """The two pre-training commands: a config, the torch CPU thread count, the run; returns its report."""
    import torch

    from runkit.logs import setup_logging as setup

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    args = parser.parse_args(argv)
    setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(load_config(config_cls, args.config, args.overrides))


@command
def pretrain_sd_main(argv: list[str] | None = None) -> int:
    """Pre-train the toy world's tiny Stable Diffusion and save it as a diffusers directory (see
    toyworld/pretrain_sd.py). Reproduces `toyworld/assets/toy-sd` from its seed:

        social-refl-pretrain-toy-sd --set output_dir=toyworld/assets/toy-sd
    """
    from toyworld.pretrain_sd import PretrainSDConfig, pretrain_toy_sd

    report = _pretrain(argv, pretrain_sd_main.__doc__, PretrainSDConfig, pretrain_toy_sd, 0,
                       "torch CPU threads (0 = torch's default)")
    print(json.dumps(report, indent=2))
    return 0


@command
def pretrain_clip_main(argv: list[str] | None = None) -> int:
    """Pre-train the toy world's tiny CLIP and ship it as toyworld/assets/toy-clip (fp16).

        social-refl-pretrain-toy-clip                     # reproduces the shipped asset
        social-refl-pretrain-toy-clip --set steps=100 --set output_dir=runs/clip-smoke
    """
    from toyworld.pretrain_clip import PretrainClipConfig, pretrain_toy_clip

    report = _pretrain(argv, pretrain_clip_main.__doc__, PretrainClipConfig, pretrain_toy_clip, 1,
                       "torch CPU threads (1 keeps runs reproducible)")
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    return 0


@command
def ablation_main(argv: list[str] | None = None) -> int:
    """ReFL variants on a finished demo (same critic, prompts and seeds), each judged against the hidden
    taste: the change from base in the critic, the oracle, each oracle term and prompt fidelity.
    Writes <demo>/ablation/ablation.json and ablation.md and prints the table. Finished variants are reused.

        social-refl-ablation --demo runs/demo                 # the regulariser study (~20 min, 2 cores)
        social-refl-ablation --demo runs/demo --variant "kl 1: refl.step.kl_weight=1" \\
            --variant "longer: refl.train.max_updates=240"
    """
    from toyworld.ablation import ablation_markdown, run_ablation
    from toyworld.variants import parse_variant

    parser = argparse.ArgumentParser(description=ablation_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished demo output folder")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                        help="a variant as DemoConfig overrides; repeat for more (default: the regulariser "
                             "study)")
    parser.add_argument("--prompts", type=int, default=32,
                        help="held-out prompts to judge on (the comparison's draw, at most 50)")
    parser.add_argument("--samples", type=int, default=16, help="paired base/ReFL samples per prompt")
    args = parser.parse_args(argv)
    setup_logging()
    variants = dict(parse_variant(v) for v in args.variant) or None
    print(ablation_markdown(run_ablation(args.demo, variants, args.prompts, args.samples)))
    return 0


@command
def study_main(argv: list[str] | None = None) -> int:
    """ReFL variants with several training seeds on a finished demo, against base and base best-of-N, judged
    by the critic, the zero-shot CLIP, the oracle, each oracle term and prompt fidelity: the mean and the
    spread across seeds beside each seed's per-prompt intervals. Writes <demo>/study/<study>.json and .md.

        social-refl-world-study --demo runs/demo                  # plain ReFL, seeds 0 1 2 (0 = the demo's run)
        social-refl-world-study --demo runs/demo --study guard    # ReFL against the hacking guards
        social-refl-world-study --demo runs/demo --seeds 0 1 2 3
        social-refl-world-study --demo runs/demo --study critic   # the critic's learning curve over seeds
    """  # noqa: E501
    from toyworld.study import DEFAULT_SEEDS, STUDIES, run_study, study_markdown

    parser = argparse.ArgumentParser(description=study_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished demo output folder")
    parser.add_argument("--study", default="world", choices=sorted([*STUDIES, "critic"]),
                        help="world: plain ReFL; guard: plain ReFL against selection, an ensemble, and both; "
                             "critic: the critic recipe on 1/8 to all of the pairs, checkpoints measured "
                             "against the oracle (toyworld/critic_study.py; no ReFL)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help="training seeds (ReFL's, or the critic's for --study critic)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.study == "critic":
        from toyworld.critic_study import critic_study_markdown, run_critic_study

        print(critic_study_markdown(run_critic_study(args.demo, args.seeds)))
        return 0
    print(study_markdown(run_study(args.demo, args.seeds, study=args.study)))
    return 0


@command
def sweep_main(argv: list[str] | None = None) -> int:
    """Choose the toy world's ReFL settings by the sweep rule (toyworld/sweep.py) on a demo's critic.

    Trains each setting of the grid with validation from update 0 on the demo's validation prompts, then
    keeps the highest reward among updates that hold the zero-shot CLIP and prompt fidelity near the base.
    Needs the demo's community and critic stages (`--until critic` is enough).

        social-refl-refl-sweep --demo runs/demo
    """
    from toyworld.sweep import run_sweep, sweep_markdown

    parser = argparse.ArgumentParser(description=sweep_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a demo output folder with a trained critic")
    args = parser.parse_args(argv)
    setup_logging()
    print(sweep_markdown(run_sweep(args.demo)))
    return 0
