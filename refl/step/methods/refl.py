"""ReFL (ImageReward's): T sampler steps, cut ~ U[cut_range] (inclusive); steps [:cut] without gradient,
one UNet call with gradient at timesteps[cut], x0 = that step's `pred_original_sample` (the remaining steps
are not run), decode, reward."""

from __future__ import annotations

from dataclasses import replace

from refl.step.blocks import phase
from refl.step.config import StepConfig, check_cut_range
from refl.step.contract import (
    WHOLE_CALLS,
    BenchSpec,
    GradMethod,
    MethodResult,
    StepContext,
    register_grad_method,
    unet_granularities,
)


def run(ctx: StepContext, latents) -> MethodResult:
    """No gradient before the cut, one call with gradient, its one-step x0."""
    timesteps = ctx.timesteps
    cut = ctx.draw_cut()
    latents = ctx.run_no_grad(latents, timesteps[:cut])
    t = timesteps[cut]
    with phase(ctx.timer, "grad_step"):
        eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
        x0 = ctx.step(eps, t, latents).pred_original_sample  # (B, C, h, w), one-step x0
    return MethodResult([x0], cut)


def pin(cfg: StepConfig) -> StepConfig:
    """The latest cut: the most no-grad calls before the one with gradient."""
    return replace(cfg, cut_range=[cfg.cut_range[1]] * 2)


def calls(cfg: StepConfig) -> tuple[int, int]:
    return cfg.cut_range[0], 1


register_grad_method("refl", GradMethod(run, WHOLE_CALLS, {"cut_range": check_cut_range},
                                        BenchSpec(pin, calls, unet_granularities(WHOLE_CALLS))))
