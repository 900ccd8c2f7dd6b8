"""Preference losses over (text, preferred image, rejected image) embeddings.

Every loss takes L2-normalised embeddings `text, pos, neg` of shape (B, D), `label` (B,) = the
probability that `pos` is preferred (1 for a clear pair, 0.5 for a tie) and `weight` (B,), and
returns a dict of named terms whose "loss" entry is what to minimise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1e-8)


class TripletLoss(nn.Module):
    """Social Reward's loss: anchor = text, relu(|t - p|^2 - |t - n|^2 + margin)."""

    handles_ties = False

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, text, pos, neg, label=None, weight=None) -> dict[str, torch.Tensor]:
        d_pos = (text - pos).pow(2).sum(-1)  # (B,)
        d_neg = (text - neg).pow(2).sum(-1)  # (B,)
        per_pair = F.relu(d_pos - d_neg + self.margin)
        return {
            "loss": _weighted_mean(per_pair, weight),
            "d_pos": d_pos.mean().detach(),
            "d_neg": d_neg.mean().detach(),
            "active_fraction": (per_pair > 0).float().mean().detach(),
        }


class PairwiseLoss(nn.Module):
    """Bradley-Terry: -log sigmoid(s * (cos_pos - cos_neg)) with a learnable logit scale s.

    With soft labels y this is the binary cross-entropy -[y log p + (1 - y) log(1 - p)].
    """

    handles_ties = True

    def __init__(self, init_logit_scale: float = 10.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def forward(self, text, pos, neg, label=None, weight=None) -> dict[str, torch.Tensor]:
        scale = self.log_scale.exp().clamp(max=100.0)
        margin = scale * ((text * pos).sum(-1) - (text * neg).sum(-1))  # (B,)
        label = torch.ones_like(margin) if label is None else label.to(margin.dtype)
        per_pair = -(label * F.logsigmoid(margin) + (1 - label) * F.logsigmoid(-margin))
        return {"loss": _weighted_mean(per_pair, weight), "logit_scale": scale.detach()}


class PickScoreLoss(nn.Module):
    """PickScore's loss: a 2-way softmax over logit_scale * cos(text, image_i), soft labels (ties 0.5/0.5).

    The scale is fixed (CLIP's own temperature, 100 by default), as PickScore keeps CLIP's logit scale.
    """

    handles_ties = True

    def __init__(self, logit_scale: float = 100.0):
        super().__init__()
        self.logit_scale = logit_scale

    def forward(self, text, pos, neg, label=None, weight=None) -> dict[str, torch.Tensor]:
        # (B, 2)
        logits = self.logit_scale * torch.stack([(text * pos).sum(-1), (text * neg).sum(-1)], dim=-1)
        label = torch.ones(logits.shape[0], device=logits.device) if label is None else label.to(logits.dtype)
        target = torch.stack([label, 1 - label], dim=-1)  # (B, 2)
        per_pair = -(target * logits.log_softmax(-1)).sum(-1)
        return {"loss": _weighted_mean(per_pair, weight)}


LOSSES: dict[str, type[nn.Module]] = {
    "triplet": TripletLoss,
    "pairwise": PairwiseLoss,
    "pickscore": PickScoreLoss,
}


def create_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name](**kwargs)
