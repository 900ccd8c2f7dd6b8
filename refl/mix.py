"""A weighted sum of rewards that remembers its terms, so the training loop can log each one.

Flow-GRPO-style multi-reward training: reward = sum_i w_i * r_i(images, prompts). The terms live on
different scales (a calibrated critic ~N(0, 1), HPS v2 ~0.25, PickScore ~20, aesthetic ~5, ImageReward
~N(0, 1)), so the weights are the user's exchange rates between them, not shares.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refl.step import RewardFn


class WeightedRewards:
    """`(images, prompts) -> (B,)` = sum of weight * term; `last_terms` holds the latest unweighted terms."""

    def __init__(self, terms: dict[str, RewardFn], weights: dict[str, float]):
        if not terms or set(terms) != set(weights):
            raise ValueError(f"a reward mix needs one weight per term, got terms {sorted(terms)} and weights "
                             f"{sorted(weights)}")
        self.terms = terms
        self.weights = {k: float(v) for k, v in weights.items()}
        # name -> (B,) detached float32 scores of the latest call; read by refl.step.reward_step for logging.
        self.last_terms: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = None
        last = {}
        for name, fn in self.terms.items():
            r = fn(images, prompts).float()  # (B,)
            last[name] = r.detach()
            total = self.weights[name] * r if total is None else total + self.weights[name] * r
        self.last_terms = last
        return total  # (B,)
