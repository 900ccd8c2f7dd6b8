"""The community's hidden taste, as a pixel-level score. Evaluation only: never shown to training.

The score is a weighted mean of interpretable terms, each in [0, 1], each measured from pixels
(via the checker's reading):
- fidelity:  share of the five prompt attributes the image gets right (what CLIP zero-shot sees);
- contrast:  luminance contrast between shape and background (WCAG ratio, log-scaled);
- vivid:     colour purity of the shape (chroma for colours; clean bright white for "white");
- placement: how exactly the shape sits on its stated position's anchor;
- size:      closeness to a preferred extent a bit bolder than the renderer's usual one;
- sharp:     crisp edges rather than blurred ones;
- clean:     a smooth background rather than grain and texture.
Beyond fidelity, each term is a small, continuous change a generator can learn (more saturated,
higher contrast, more exactly placed, slightly larger, crisper, calmer backgrounds) and none is a
matter of which words describe the image, so a CLIP that only matches text and image does not
measure them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toyworld.checker import Reading, check_reading, read_image
from toyworld.world import ANCHORS, ATTRIBUTES, Scene, parse_prompt

TERMS: tuple[str, ...] = ("fidelity", "contrast", "vivid", "placement", "size", "sharp", "clean")
# The shared taste: fidelity counts double, the aesthetics once each.
DEFAULT_WEIGHTS: dict[str, float] = {"fidelity": 2.0, "contrast": 1.0, "vivid": 1.0, "placement": 1.0,
                                     "size": 1.0, "sharp": 1.0, "clean": 1.0}
# Preferred extent (fraction of the side) per size class: the top of the renderer's range or beyond.
PREFERRED_EXTENT: dict[str, float] = {"small": 0.30, "large": 0.58}
SIZE_TOLERANCE = 0.15  # extent error (fraction of the side) at which the size term reaches 0
PLACEMENT_SIGMA = 0.05  # centroid error (fraction of the side) at which placement falls to exp(-1/2)
SHARP_RANGE = (0.20, 0.45)  # edge-sharpness statistic mapped to 0 .. 1 (crisp renders reach ~0.45)
NOISE_AT_ZERO = 12.0  # background residual std (RGB units) at which the clean term reaches 0
CONTRAST_FULL = 7.0  # a WCAG contrast ratio of 7:1 or more scores 1


def _relative_luminance(rgb: np.ndarray) -> float:
    c = np.clip(rgb / 255.0, 0, 1)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ np.array([0.2126, 0.7152, 0.0722]))


def _vivid(fg: np.ndarray, colour: str) -> float:
    chroma = float(fg.max() - fg.min()) / 255.0
    if colour == "white":
        # A good white is bright and neutral: lose 1 per 100 levels of darkness and per 0.5 chroma.
        return float(np.clip(1.0 - (255.0 - fg.mean()) / 100.0 - 2.0 * chroma, 0, 1))
    return float(np.clip(chroma / 0.85, 0, 1))


def reading_terms(reading: Reading, scene: Scene) -> dict[str, float]:
    """The oracle's terms for one measured image against the scene it was asked to show."""
    checks = check_reading(reading, scene)
    terms = {"fidelity": float(np.mean([checks[a] for a in ATTRIBUTES]))}
    terms["clean"] = float(np.clip(1.0 - reading.bg_noise / NOISE_AT_ZERO, 0, 1))
    if not reading.found:  # nothing drawn: no shape to judge
        terms.update(contrast=0.0, vivid=0.0, placement=0.0, size=0.0, sharp=0.0)
        return {t: terms[t] for t in TERMS}
    lf, lb = _relative_luminance(reading.fg), _relative_luminance(reading.bg)
    ratio = (max(lf, lb) + 0.05) / (min(lf, lb) + 0.05)
    terms["contrast"] = float(np.clip(np.log(ratio) / np.log(CONTRAST_FULL), 0, 1))
    terms["vivid"] = _vivid(reading.fg, scene.colour)
    ax, ay = ANCHORS[scene.position]
    d2 = (reading.cx - ax) ** 2 + (reading.cy - ay) ** 2
    terms["placement"] = float(np.exp(-0.5 * d2 / PLACEMENT_SIGMA**2))
    err = abs(reading.extent - PREFERRED_EXTENT[scene.size])
    terms["size"] = float(np.clip(1.0 - err / SIZE_TOLERANCE, 0, 1))
    lo, hi = SHARP_RANGE
    terms["sharp"] = float(np.clip((reading.sharpness - lo) / (hi - lo), 0, 1))
    return {t: terms[t] for t in TERMS}


def _items(images) -> list:
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"expected images as (N, H, W, 3), got shape {images.shape}")
        return list(images)  # (N, H, W, 3) -> N x (H, W, 3)
    return list(images)


def oracle_terms(images, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-term breakdown, torch-free: {term: (N,) float in [0, 1]}.

    `images`: (N, H, W, 3) uint8 (or float in [0, 1]) array, or a list of PIL images / arrays.
    """
    items = _items(images)
    if len(items) != len(prompts):
        raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
    rows = [reading_terms(read_image(img), parse_prompt(p)) for img, p in zip(items, prompts)]
    return {t: np.array([r[t] for r in rows], dtype=np.float64) for t in TERMS}


def combine_terms(terms: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
    """Weighted mean of the terms: (N,)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown oracle terms {sorted(unknown)}; known: {TERMS}")
    total = sum(weights.values())
    return sum(w * terms[t] for t, w in weights.items()) / total


def oracle_score(images, prompts: Sequence[str], weights: dict[str, float] | None = None) -> np.ndarray:
    """The community's shared taste: (N,) scores in [0, 1], higher = liked more."""
    return combine_terms(oracle_terms(images, prompts), weights)
