"""The community feed's guidance scales for another world model, chosen from what a platform sees of its own
samples: prompt fidelity (the world's checker) and how much a prompt's images differ from each other. Never
the oracle: the scales are a world parameter, fixed before any method runs on that world.

The toy SD's feed (`toyworld.demo.config.FEED_GUIDANCE`) spans that model's range from loose samples to
strict ones. Another model may reach a given looseness at other scales (a flow model's samples of a prompt may
keep closer together at the same guidance), so its feed keeps the toy SD's shape (the
same number of images, the same repeats) and maps each of the toy SD's scales g to the candidate scale where
the other model's within-prompt spread is nearest the toy SD's at g, among candidates whose prompt fidelity
is at most `fidelity_margin` below the toy SD's at its loosest feed scale (a feed still of the prompts).
Ties go to the larger scale.

Within-prompt spread: the per-pixel standard deviation over a prompt's `n_seeds` images (pixels in [0, 1]),
averaged over pixels and prompts. The prompts are training prompts outside any demo's community draw (their
own random draw) and the seeds are far from the feed's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runkit.files import write_json

logger = logging.getLogger(__name__)

CANDIDATES = [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]


@dataclass
class FeedScalesConfig:
    # The model whose feed scales are matched to: a shipped short name (toy-sd) or a folder.
    reference_model: str = "toy-sd"
    # The model whose feed scales are chosen.
    model: str = "toy-flow"
    # The reference model's feed (one scale per image of a prompt), mapped scale by scale.
    reference_feed: list[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 4.0, 6.0, 1.5, 2.0, 4.0])
    # Guidance scales measured on both models.
    candidates: list[float] = field(default_factory=lambda: list(CANDIDATES))
    # Training prompts drawn (their own random draw, `prompt_seed`) and images per prompt and scale.
    n_prompts: int = 48
    n_seeds: int = 4
    prompt_seed: int = 900
    # First sampling seed; far from the demo's feed (0) and held-out (500,000) seeds.
    seed: int = 900_000
    # Sampler steps (the demo's).
    num_inference_steps: int = 20
    # Prompt fidelity a chosen scale may lose against the reference's loosest feed scale (a share, 0-1).
    fidelity_margin: float = 0.05
    # Where feed_scales.json goes.
    output_dir: str = "runs/feed-scales"

    def __post_init__(self):
        if self.n_seeds < 2:
            raise ValueError(f"n_seeds must be >= 2 (a spread needs two images), got {self.n_seeds}")
        missing = sorted(set(self.reference_feed) - set(self.candidates))
        if missing:
            raise ValueError(f"reference_feed scales {missing} are not among the candidates "
                             f"{self.candidates}")


def within_prompt_spread(images: np.ndarray) -> float:
    """(P, S, H, W, 3) uint8 -> the mean over prompts and pixels of the per-pixel std over the S images."""
    return float((images.astype(np.float64) / 255.0).std(axis=1).mean())


def scale_profile(model: str, prompts: list[str], cfg: FeedScalesConfig) -> dict[str, dict]:
    """Per candidate scale: prompt fidelity and within-prompt spread of `model`'s images of `prompts`."""
    from refl.components import family_of, load_components
    from refl.sampling import family_scheduler, make_pipeline, sample
    from toyworld.checker import prompt_fidelity
    from toyworld.demo.config import shipped_model

    folder = shipped_model(model)
    pipe = make_pipeline(load_components(folder), family_scheduler(family_of(folder)))
    n = len(prompts)
    out = {}
    for g in cfg.candidates:
        slots = [sample(pipe, prompts, seeds=range(cfg.seed + s * n, cfg.seed + (s + 1) * n),
                        num_inference_steps=cfg.num_inference_steps, guidance_scale=g, batch_size=64)
                 for s in range(cfg.n_seeds)]
        images = np.stack(slots, axis=1)  # (P, S, H, W, 3)
        flat = images.reshape(-1, *images.shape[2:])  # (P * S, H, W, 3), prompt-major
        repeated = [p for p in prompts for _ in range(cfg.n_seeds)]
        row = {"prompt_fidelity": float(prompt_fidelity(flat, repeated)),
               "spread": within_prompt_spread(images)}
        out[f"{g:g}"] = row
        logger.info("%s at guidance %g: fidelity %.3f, spread %.4f", model, g, row["prompt_fidelity"],
                    row["spread"])
    return out


def match_scales(reference: dict[str, dict], target: dict[str, dict], reference_feed: list[float],
                 fidelity_margin: float) -> list[float]:
    """The target model's feed: each scale of `reference_feed` replaced by the target's candidate whose
    spread is nearest the reference's at that scale, among candidates whose fidelity is at least the
    reference's at its loosest feed scale minus `fidelity_margin` (ties: the larger scale)."""
    floor = reference[f"{min(reference_feed):g}"]["prompt_fidelity"] - fidelity_margin
    allowed = [float(g) for g, v in target.items() if v["prompt_fidelity"] >= floor]
    if not allowed:
        raise ValueError(f"no candidate scale keeps prompt fidelity >= {floor:.3f} on the target model")

    def nearest(g: float) -> float:
        want = reference[f"{g:g}"]["spread"]
        return min(allowed, key=lambda c: (abs(target[f"{c:g}"]["spread"] - want), -c))

    return [nearest(g) for g in reference_feed]


def run_feed_scales(cfg: FeedScalesConfig) -> dict:
    """Both models' profiles and the chosen feed; writes <output_dir>/feed_scales.json."""
    from runkit.files import check_output_dir
    from toyworld.demo.config import shipped_model
    from toyworld.world import split_prompts

    # Both models and the output folder checked before minutes of sampling, not at the last write.
    check_output_dir(cfg.output_dir, "output_dir")
    for key in ("reference_model", "model"):
        folder = Path(shipped_model(getattr(cfg, key)))
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{key} {folder} is not a diffusers model folder (no model_index.json); "
                                    "name a shipped model (toy-sd, toy-flow) or a model folder")
    train = split_prompts(seed=0)[0]
    rng = np.random.default_rng(cfg.prompt_seed)
    prompts = [train[i] for i in rng.choice(len(train), cfg.n_prompts, replace=False)]
    profiles = {m: scale_profile(m, prompts, cfg) for m in (cfg.reference_model, cfg.model)}
    feed = match_scales(profiles[cfg.reference_model], profiles[cfg.model], cfg.reference_feed,
                        cfg.fidelity_margin)
    result = {"reference_model": cfg.reference_model, "model": cfg.model,
              "reference_feed": cfg.reference_feed, "feed": feed, "profiles": profiles,
              "n_prompts": cfg.n_prompts, "n_seeds": cfg.n_seeds}
    write_json(Path(cfg.output_dir) / "feed_scales.json", result)
    return result


def feed_scales_markdown(result: dict) -> str:
    ref, model = result["reference_model"], result["model"]
    rows = [f"| guidance | {ref} fidelity | {ref} spread | {model} fidelity | {model} spread |",
            "|---|---|---|---|---|"]
    for g in result["profiles"][model]:
        r, t = result["profiles"][ref][g], result["profiles"][model][g]
        rows.append(f"| {g} | {r['prompt_fidelity']:.1%} | {r['spread']:.4f} | {t['prompt_fidelity']:.1%} | "
                    f"{t['spread']:.4f} |")
    rows.append("")
    rows.append(f"{ref}'s feed {result['reference_feed']} -> {model}'s feed {result['feed']}")
    return "\n".join(rows)
