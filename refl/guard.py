"""Reward hacking, seen while training and stopped before it.

ReFL climbs its reward; whether the images get better or only the reward does shows in judges that
never reach the gradient. At every validation (refl/train.py) the validation images are scored by
held-out judges (`train.heldout_evaluators`, evaluator specs of reward.evaluators, logged as
eval/heldout/<spec>) and their diversity is measured (eval/diversity); `train.select_by` keeps the
LoRA its judge liked best as lora_best/, and `train.stop_after_drops` stops the run once that judge
keeps falling while the training reward keeps rising: the signature of a reward being hacked.

A *drop*, precisely: validation v is a drop when the select_by judge's mean score is strictly below
its score at validation v - 1 AND the training reward on the same validation images (eval/reward) is
strictly above its value at validation v - 1. Any other validation (the judge held or rose, or the
reward did not rise: then both are just degrading, or the run has stalled, which is not hacking)
resets the count to 0; the first validation has no predecessor and is no drop. The run stops at the
validation where the count reaches stop_after_drops.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from refl.config import ReflTrainConfig

logger = logging.getLogger(__name__)

HELDOUT_PREFIX = "eval/heldout/"


def judge_specs(t: ReflTrainConfig) -> list[str]:
    """The held-out judges to create: heldout_evaluators, plus select_by if it is not among them."""
    specs = list(dict.fromkeys(t.heldout_evaluators))
    if t.select_by and t.select_by not in specs:
        specs.append(t.select_by)
    return specs


def check_judges(t: ReflTrainConfig) -> None:
    """Each judge's spec resolved without loading a weight (its kind registered or declared; a critic
    folder, an open_clip name or a standard reward's files found), before the diffusion model loads; one
    line naming the key and the fix."""
    from reward.evaluators import parse_spec
    from reward.standard import STANDARD_KINDS, check_spec

    for spec in judge_specs(t):
        key = "train.heldout_evaluators" if spec in t.heldout_evaluators else "train.select_by"
        try:
            kind, argument = parse_spec(spec)
            if kind in ("critic", "clip"):
                check_spec(argument)
            elif kind == "ensemble":
                for member in (p for p in argument.split(",") if p and "=" not in p):
                    check_spec(member)
            elif kind in STANDARD_KINDS:
                check_spec(spec)
        except (ValueError, OSError) as err:
            raise type(err)(f"{key} {spec}: {err}") from None


def create_judges(t: ReflTrainConfig, device) -> dict:
    """spec -> evaluator, each created once through the one factory (reward.evaluators.create_evaluator)."""
    from reward.evaluators import create_evaluator

    return {spec: create_evaluator(spec, str(device)) for spec in judge_specs(t)}


def judge(judges: dict, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Mean score of each judge on images (N, 3, H, W) in [0, 1], as uint8 like stored samples."""
    from refl.sampling import to_uint8

    if not judges:
        return {}
    pixels = to_uint8(images)  # (N, H, W, 3)
    return {HELDOUT_PREFIX + spec: float(fn(pixels, list(prompts)).mean()) for spec, fn in judges.items()}


def pixel_diversity(images: torch.Tensor, per_prompt: int) -> float | None:
    """Mean pairwise L2 distance between the images of one prompt, averaged over prompts; None if
    per_prompt < 2. `images` (P * per_prompt, 3, H, W) in [0, 1], prompt-major (each prompt's images
    adjacent). Measured in pixels rather than in a judge's embedding so that refl/ needs no
    particular model or the harness; a value falling towards 0 means the samples of a prompt
    collapse onto one image (mode collapse, a common end of reward hacking)."""
    if per_prompt < 2:
        return None
    x = images.float().clamp(0, 1).reshape(-1, per_prompt, images[0].numel())  # (P, k, 3*H*W)
    dist = torch.cdist(x, x)  # (P, k, k)
    pairs = per_prompt * (per_prompt - 1)  # ordered pairs off the diagonal; the diagonal is 0
    return float((dist.sum(dim=(1, 2)) / pairs).mean())


def count_validations(t: ReflTrainConfig) -> int:
    """How many validations a run from update 0 makes (at update 0 if validate_at_start, every validate_every
    updates and at the end)."""
    if not t.validation_prompts:
        return 0
    start = int(t.validate_at_start)
    if t.validate_every <= 0:
        return start + 1
    return start + t.max_updates // t.validate_every + (1 if t.max_updates % t.validate_every else 0)


def warn_if_too_few_validations(t: ReflTrainConfig) -> None:
    """select_by needs 2 validations to choose, stop_after_drops needs K + 1 to ever fire. Only a
    warning (refl.config.check_guard_config says why): the run is valid, the guard just idles."""
    n = count_validations(t)
    if t.select_by and n < 2:
        logger.warning("train.select_by=%s: only %d validation(s) in %d updates (validate_every=%d), so "
                       "lora_best is the final LoRA; lower train.validate_every", t.select_by, n,
                       t.max_updates, t.validate_every)
    if t.stop_after_drops > 0 and n < t.stop_after_drops + 1:
        logger.warning("train.stop_after_drops=%d can never stop this run: %d drops need %d validations, it "
                       "makes %d; lower train.validate_every", t.stop_after_drops, t.stop_after_drops,
                       t.stop_after_drops + 1, n)


def track(state, score: float, reward: float) -> bool:
    """Fold one validation into the run's selection state; returns whether `score` is a new best.

    `state` (refl.train.TrainState) carries best_score, best_update, drops, prev_score, prev_reward
    (they go into each checkpoint's state.json, so --resume continues the same count)."""
    improved = state.best_score is None or score > state.best_score
    if improved:
        state.best_score, state.best_update = score, state.update
    dropped = (state.prev_score is not None and score < state.prev_score and reward > state.prev_reward)
    state.drops = state.drops + 1 if dropped else 0
    state.prev_score, state.prev_reward = score, reward
    return improved


def share(state, stop: bool, accelerator) -> bool:
    """Give every process the main process's selection state and stop decision (validation runs there
    only; a process that missed the stop would wait forever in the next collective)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return stop
    payload = [state.best_score, state.best_update, state.drops, state.prev_score, state.prev_reward, stop]
    broadcast_object_list(payload)
    state.best_score, state.best_update, state.drops, state.prev_score, state.prev_reward, stop = payload
    return bool(stop)
