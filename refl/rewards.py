"""What ReFL maximises: reward factories by `reward.kind`, all frozen, all differentiable in the images.

A reward is a callable `(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`. Add a kind by adding a
factory `(cfg: RewardSourceConfig, device, dtype=..., gradient_checkpointing=...) -> RewardFn` to REWARDS.
"""

from __future__ import annotations

import logging

import torch

from refl.config import RewardSourceConfig
from refl.step import RewardFn
from reward.standard import STANDARD_KINDS

logger = logging.getLogger(__name__)


def _frozen_critic(path: str, device, dtype: torch.dtype, gradient_checkpointing: bool):
    import reward

    critic = reward.load(path, device=device)
    critic.requires_grad_(False).eval()  # frozen: gradients pass through it to the images, never into it
    # The towers in the base's dtype (a ViT-L-14 is 1.7 GB in fp32); calibration buffers stay fp32.
    critic.clip.to(dtype)
    critic.set_grad_checkpointing(gradient_checkpointing)
    return critic


def _critic_reward(cfg: RewardSourceConfig, device, dtype: torch.dtype = torch.float32,
                   gradient_checkpointing: bool = False) -> RewardFn:
    """One critic, or with several in reward.critic their ensemble (mean - ensemble_penalty x std)."""
    from reward.ensemble import CriticEnsemble

    paths = [cfg.critic] if isinstance(cfg.critic, str) else list(cfg.critic)
    members = [_frozen_critic(p, device, dtype, gradient_checkpointing) for p in paths]
    if len(members) == 1:
        if cfg.ensemble_penalty:
            logger.warning("reward.ensemble_penalty=%g has no effect with a single critic",
                           cfg.ensemble_penalty)
        return members[0]
    logger.info("critic ensemble of %d: reward = mean - %g x std", len(members), cfg.ensemble_penalty)
    return CriticEnsemble(members, cfg.ensemble_penalty)


def _brightness_reward(cfg: RewardSourceConfig, device, **_) -> RewardFn:
    return lambda images, prompts: images.mean(dim=(1, 2, 3))  # (B,)


def _contrast_reward(cfg: RewardSourceConfig, device, **_) -> RewardFn:
    def fn(images, prompts):
        w = images.shape[-1] // 2
        return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10  # (B,)

    return fn


def _standard_reward(kind: str):
    def factory(cfg: RewardSourceConfig, device, dtype: torch.dtype = torch.float32,
                gradient_checkpointing: bool = False) -> RewardFn:
        from reward.standard import load_standard

        # frozen, eval
        model = load_standard(f"{kind}:{cfg.standard.get(kind) or ''}", device=device, dtype=dtype)
        model.set_grad_checkpointing(gradient_checkpointing)
        return model

    return factory


def _check_mix(cfg: RewardSourceConfig) -> None:
    if not cfg.mix:
        raise ValueError("reward.kind=mix needs reward.mix, e.g. {critic: 1.0, hpsv2: 0.5}")
    bad = [name for name in cfg.mix if name not in REWARDS or name == "mix"]
    if bad:
        raise ValueError(f"reward.mix terms {bad} are not reward kinds; choose from "
                         f"{sorted(k for k in REWARDS if k != 'mix')}")


def _mix_reward(cfg: RewardSourceConfig, device, **kwargs) -> RewardFn:
    from refl.mix import WeightedRewards

    _check_mix(cfg)
    return WeightedRewards({name: REWARDS[name](cfg, device, **kwargs) for name in cfg.mix}, cfg.mix)


REWARDS = {"critic": _critic_reward, "brightness": _brightness_reward, "contrast": _contrast_reward,
           **{kind: _standard_reward(kind) for kind in STANDARD_KINDS}, "mix": _mix_reward}


def _check_kinds(cfg: RewardSourceConfig) -> None:
    if cfg.kind not in REWARDS:
        raise ValueError(f"unknown reward.kind {cfg.kind!r}; choose one of {sorted(REWARDS)}")
    unused = sorted(set(cfg.standard) - set(STANDARD_KINDS))
    if unused:
        raise ValueError(f"reward.standard has unknown kinds {unused}; choose from {sorted(STANDARD_KINDS)}")


def check_reward(cfg: RewardSourceConfig) -> None:
    """What `build_reward` will load, resolved without loading a weight: the kinds, each critic (a critic
    folder holding its files, or an open_clip name open_clip knows) and each standard reward's files, so a
    typo stops a run before the diffusion model loads (minutes on SDXL). One line naming the key and the
    fix."""
    from reward.standard import check_spec

    _check_kinds(cfg)
    if cfg.kind == "mix":
        _check_mix(cfg)
    for kind in list(cfg.mix) if cfg.kind == "mix" else [cfg.kind]:
        if kind == "critic":
            specs = {"reward.critic": [cfg.critic] if isinstance(cfg.critic, str) else list(cfg.critic)}
        elif kind in STANDARD_KINDS:
            specs = {f"reward.standard.{kind}": [f"{kind}:{cfg.standard.get(kind) or ''}"]}
        else:
            continue
        for key, values in specs.items():
            for spec in values:
                try:
                    check_spec(spec)
                except (ValueError, OSError) as err:
                    raise type(err)(f"{key} {spec}: {err}") from None


def build_reward(cfg: RewardSourceConfig, device, dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False) -> RewardFn:
    """The frozen reward, its weights in `dtype`, checkpointed in backward if asked (where it can be)."""
    _check_kinds(cfg)
    return REWARDS[cfg.kind](cfg, device, dtype=dtype, gradient_checkpointing=gradient_checkpointing)
