"""ReFL variants x training seeds on a finished demo: the one runner behind the regulariser ablation
(toyworld/ablation.py) and the seed and guard studies (toyworld/study.py).

A variant is a list of demo-config overrides ("{clip_model}" stands for the demo's zero-shot CLIP). Each
(variant, seed) trains the demo's ReFL config plus the overrides with `refl.train.seed` = seed against the
demo's critic (or a critic ensemble when the variant sets `n_critic_members`), and draws the same held-out
prompts with the same sampling seeds as the base model, so each difference from base is paired per prompt.
Base samples depend on neither the variant nor the seed: they are drawn once and copied.

Runs live in <root>/<variant>/seed-N/ (the comparison's folder, ReFL's run in refl/ inside it) and are
reused while their settings and input files are unchanged. The variant without overrides at the demo's own
seed is the demo's own ReFL run; judged like the demo, it is the demo's own comparison too.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from runkit.config import override
from toyworld.demo.config import DemoConfig

logger = logging.getLogger(__name__)


@dataclass
class FinishedDemo:
    folder: Path
    cfg: DemoConfig  # its resolved config (demo_config.yaml)

    @property
    def critic(self) -> Path:
        """The selector of best-of-N and ReFL's reward (the first critic when there are several)."""
        return self.folder / "critic" / "critic"

    @property
    def prompts_file(self) -> Path:
        """The held-out prompts of the demo's comparison."""
        return self.folder / "compare_prompts.txt"


def open_demo(demo_dir: str | Path) -> FinishedDemo:
    """A finished demo's folder and config; FileNotFoundError naming what a finished demo has otherwise."""
    from runkit.config import load_config

    folder = Path(demo_dir)
    config_file = folder / "demo_config.yaml"
    if not (config_file.is_file() and (folder / "critic" / "critic").is_dir()
            and (folder / "summary.json").is_file()):
        raise FileNotFoundError(f"{folder} is not a finished demo (needs demo_config.yaml, critic/critic and "
                                "summary.json); run `social-refl-demo --out DIR` first")
    return FinishedDemo(folder, load_config(DemoConfig, config_file))


def slug(name: str) -> str:
    """A variant's name as a folder name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name: key=value key=value' -> (name, overrides)."""
    name, sep, rest = spec.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"variant {spec!r} must look like 'name: key=value key=value'")
    return name.strip(), rest.split()


def copy_base_samples(source: Path, folder: Path, models: Sequence[str] = ("base",)) -> None:
    """The base arm's (or these models') samples and scores of the comparison in `source`, copied into
    `folder` unless there (the harness checks their fingerprints before it uses them)."""
    for model in models:
        for part in ("samples", "scores"):
            if not (folder / part / model).exists() and (source / part / model).exists():
                shutil.copytree(source / part / model, folder / part / model)


def ensemble_members(cfg: DemoConfig, demo_members: list[str], pairs: str, out: Path) -> list[str]:
    """`cfg.n_critic_members` critic directories: the demo's own, then members trained here (seed + k) as the
    demo would have trained them; a finished member is reused while its settings and pairs are unchanged."""
    from runkit.files import write_json
    from toyworld.demo.config import critic_config
    from toyworld.demo.stages import enter_stage, train_critic_member, trainer_settings

    members = list(demo_members)[: cfg.n_critic_members]
    for k in range(len(members), cfg.n_critic_members):
        member_dir = out / f"member-{k}"
        settings = {**trainer_settings(critic_config(cfg, pairs, member_dir)), "member": k}
        if enter_stage(member_dir, member_dir / "member.json", settings,
                       {"pairs": str(Path(pairs).parent), "clip_model": cfg.clip_model}) is None:
            write_json(member_dir / "member.json", {"critic": train_critic_member(cfg, pairs, member_dir, k)})
        members.append(str(member_dir / "critic"))
    return members


@dataclass
class VariantRun:
    """One (variant, seed): its config, the ReFL stage's result, the comparison's results and its folder."""

    cfg: DemoConfig
    refl: dict
    results: dict
    folder: Path


# A run's comparison config from (the run's demo config, the LoRA to judge, the comparison's folder).
CompareFor = Callable[[DemoConfig, str, Path], object]


def run_variants(demo: FinishedDemo, root: Path, variants: dict[str, list[str]], seeds: Sequence[int],
                 compare: CompareFor | None = None) -> dict[str, dict[int, VariantRun]]:
    """Train and judge each variant once per seed under `root`; finished runs are reused.

    `compare` gives a run's comparison config; None judges like the demo (its prompts, samples and judges,
    without best-of-n on the tuned model, which nothing here reads). Every variant's overrides are checked
    before anything trains, so a typo in the last one costs nothing."""
    from evaluation.harness import run_compare
    from toyworld.demo.config import compare_config
    from toyworld.demo.layout import community_pairs_file, critic_dirs
    from toyworld.demo.stages import stage_refl
    from toyworld.world import split_prompts

    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {list(seeds)}")
    # Only "{clip_model}" is filled: other braces are YAML (a list or a mapping as a value).
    resolved = {name: [o.replace("{clip_model}", demo.cfg.clip_model) for o in overrides]
                for name, overrides in variants.items()}
    configs = {name: override(demo.cfg, overrides) for name, overrides in resolved.items()}
    pairs = str(community_pairs_file(demo.folder))
    demo_members = critic_dirs(demo.folder / "critic", demo.cfg.n_critic_members)
    train_prompts = split_prompts(seed=0)[0]
    base_source = demo.folder if compare is None else None  # the first comparison drawn, when not the demo's
    runs: dict[str, dict[int, VariantRun]] = {}
    for name, vcfg in configs.items():
        members = ensemble_members(vcfg, demo_members, pairs, root / "critics")
        reward_critic = members if len(members) > 1 else str(demo.critic)
        runs[name] = {}
        for seed in seeds:
            cfg = override(vcfg, [f"refl.train.seed={int(seed)}"])
            demos_own = not resolved[name] and seed == demo.cfg.refl.train.seed
            folder = root / slug(name) / f"seed-{seed}"
            refl_dir = demo.folder / "refl" if demos_own else folder / "refl"
            if demos_own and compare is None:
                folder = demo.folder
            elif base_source is not None:
                copy_base_samples(base_source, folder)
            logger.info("%s, seed %d (%s): ReFL in %s", name, seed,
                        " ".join(resolved[name]) or "the demo's settings", refl_dir)
            refl = stage_refl(cfg, reward_critic, train_prompts, refl_dir)
            lora = refl["lora_best"] if cfg.refl.train.select_by else refl["lora"]
            if folder == demo.folder:  # judged already (a harness run there would replace its report)
                results = json.loads((demo.folder / "results.json").read_text())
            else:
                ccfg = (compare(cfg, lora, folder) if compare is not None else
                        replace(compare_config(cfg, str(demo.critic), lora, demo.prompts_file, folder),
                                tuned_best_of=False))
                results = run_compare(ccfg)
                base_source = base_source or folder
            runs[name][int(seed)] = VariantRun(cfg, refl, results, folder)
    return runs


def interval_cell(d: dict) -> str:
    """A mean with its 95% interval, signed: `+0.123 [+0.045, +0.201]`."""
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table: the header, its rule, one line per row."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]
