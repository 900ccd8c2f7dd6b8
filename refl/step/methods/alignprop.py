"""AlignProp-style truncation: cut ~ U[cut_range] once per trajectory, gradient through every step from the
cut to the end."""

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
    """Gradient through every step from the cut to the end."""
    timesteps = ctx.timesteps
    cut = ctx.draw_cut()
    latents = ctx.run_no_grad(latents, timesteps[:cut])
    with phase(ctx.timer, "grad_step"):
        for t in timesteps[cut:]:
            eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
            latents = ctx.step(eps, t, latents).prev_sample
    return MethodResult([latents], cut)


def pin(cfg: StepConfig) -> StepConfig:
    """The earliest cut: the longest gradient path."""
    return replace(cfg, cut_range=[cfg.cut_range[0]] * 2)


def calls(cfg: StepConfig) -> tuple[int, int]:
    return cfg.cut_range[0], cfg.num_inference_steps - cfg.cut_range[0]


register_grad_method("alignprop", GradMethod(run, WHOLE_CALLS, {"cut_range": check_cut_range},
                                             BenchSpec(pin, calls, unet_granularities(WHOLE_CALLS))))
