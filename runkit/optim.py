"""Optimizers of both trainers, by name (`train.optimizer`)."""

from __future__ import annotations

import torch


def _adamw(params, lr: float, weight_decay: float, betas, eps: float):
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def _adamw_8bit(params, lr: float, weight_decay: float, betas, eps: float):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError("train.optimizer=adamw8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA), "
                           "or set train.optimizer=adamw") from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw_8bit}


def build_optimizer(params, t) -> torch.optim.Optimizer:
    """The optimizer `t.optimizer` names, from a trainer's `train` config (runkit.config.TrainSettings)."""
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer {t.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[t.optimizer](params, t.lr, t.weight_decay, t.adam_betas, t.adam_eps)
