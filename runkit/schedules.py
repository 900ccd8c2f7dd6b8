"""Learning-rate schedules of both trainers, counted in optimizer updates.

Warm-up is linear from lr / warmup_updates at the first update to lr at update `warmup_updates`
(never a wasted update at lr 0), then the named shape decays over the remaining updates."""

from __future__ import annotations

import math

import torch


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _linear(progress: float) -> float:
    return max(0.0, 1.0 - progress)


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine, "linear": _linear}


def lr_factor(name: str, warmup_updates: int, total_updates: int):
    """update index (0-based) -> multiplier of the peak LR."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown train.lr_schedule {name!r}; choose one of {sorted(LR_SCHEDULES)}")
    shape = LR_SCHEDULES[name]

    def factor(update: int) -> float:
        if update < warmup_updates:
            return (update + 1) / warmup_updates
        return shape((update - warmup_updates) / max(1, total_updates - warmup_updates))

    return factor


def build_lr_scheduler(name: str, optimizer, warmup_updates: int, total_updates: int):
    """A LambdaLR stepped once per optimizer update that really happened."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(name, warmup_updates, total_updates))
