"""The toy world's evaluators for the comparison harness, declared as entry points (group
`social_refl.evaluators` in pyproject.toml; reward/evaluators.py imports them only when a spec names them):
`oracle:` is the community's hidden taste, `fidelity:` whether shape, colour and background match
the prompt. Both read uint8 (N, H, W, 3) images and return (N,) scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toyworld.checker import MAIN_ATTRIBUTES, check
from toyworld.oracle import oracle_score


def oracle(argument: str = "", device: str = "cpu"):
    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return oracle_score(list(images), list(prompts))  # (N,)

    return score


def fidelity(argument: str = "", device: str = "cpu"):
    def score(images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return np.array([float(all(check(img, p)[a] for a in MAIN_ATTRIBUTES))
                         for img, p in zip(images, prompts)])  # (N,) 1 = all three right

    return score


# How the toy world's tables and summaries name its judges (evaluation.report.short_name labels, by kind):
# the zero-shot toy CLIP and the two judges above.
JUDGE_LABELS = {"clip": "zero-shot CLIP", "oracle": "oracle", "fidelity": "prompt fidelity"}
