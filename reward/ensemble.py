"""An ensemble of critics whose reward is harder to hack: the members' mean minus k x their spread.

Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization" (ICLR 2024): optimising the
uncertainty-weighted objective mean - k * std over independently trained reward models keeps the
policy where the members agree, which is where a reward model is still right. An exploit one critic
fell for is seldom shared by all, so it raises the std and pays for itself.

The std is the population std (divide by M, not M - 1), computed from the deviations to the first
member, so identical members give exactly the single critic's score and a spread of exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with gradient 0 (not inf * 0 = NaN) where x == 0, e.g. members that agree exactly."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def mean_and_std(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (M, B) -> members' mean (B,) and population std (B,); exact for identical members."""
    deviation = scores - scores[:1]  # (M, B), exactly 0 where a member equals the first
    offset = deviation.mean(0)  # (B,)
    variance = ((deviation - offset) ** 2).mean(0)  # (B,)
    return scores[0] + offset, _safe_sqrt(variance)


class CriticEnsemble(nn.Module):
    """`(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` = mean - penalty * std over the member critics.

    Differentiable in the images like one critic. `last_terms` holds the latest call's per-member
    scores (`critic_0`, `critic_1`, ...) and their spread (`critic_std`), detached, for logging
    (refl.step logs them as train/reward/<term>)."""

    def __init__(self, members: Sequence[nn.Module], penalty: float = 0.0):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 critics, got {len(members)}")
        if penalty < 0:
            raise ValueError(f"the ensemble penalty must be >= 0, got {penalty}")
        self.members = nn.ModuleList(members)
        self.penalty = float(penalty)  # k: reward units subtracted per unit of the members' std
        self.last_terms: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def set_grad_checkpointing(self, enable: bool = True) -> CriticEnsemble:
        for member in self.members:
            member.set_grad_checkpointing(enable)
        return self

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        scores = torch.stack([member(images, prompts).float() for member in self.members])  # (M, B)
        mean, std = mean_and_std(scores)  # (B,), (B,)
        self.last_terms = {**{f"critic_{i}": s.detach() for i, s in enumerate(scores)},
                           "critic_std": std.detach()}
        if self.penalty == 0:
            return mean  # (B,)
        return mean - self.penalty * std  # (B,)
