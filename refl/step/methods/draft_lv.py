"""DRaFT-LV: sample to the end without gradient, then n times (`draft_lv_n`) re-noise the sample to the last
timestep and denoise it with gradient; the loss averages the n predictions (lower variance)."""

from __future__ import annotations

from dataclasses import replace

import torch

from refl.step.blocks import phase
from refl.step.config import StepConfig
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
    """The finished sample re-noised to the last timestep and denoised with gradient, n times."""
    timesteps = ctx.timesteps
    x0 = ctx.run_no_grad(latents, timesteps)  # (B, C, h, w), the finished sample
    t = timesteps[-1]
    outs = []
    with phase(ctx.timer, "grad_step"):
        for _ in range(ctx.cfg.draft_lv_n):
            noise = torch.randn(x0.shape, generator=ctx.generator).to(x0.device)  # (B, C, h, w)
            xt = ctx.add_noise(x0, noise, t)  # re-noise to the last timestep
            eps = ctx.grad_eps(xt, t)  # (B, C, h, w)
            outs.append(ctx.step(eps, t, xt).pred_original_sample)
    return MethodResult(outs, len(timesteps) - 1)


def check_draft_lv_n(cfg: StepConfig) -> None:
    if cfg.draft_lv_n < 1:
        raise ValueError(f"draft_lv_n={cfg.draft_lv_n} must be >= 1")


def pin(cfg: StepConfig) -> StepConfig:
    """Its path is fixed (after the whole trajectory); the cut it reports is recorded."""
    return replace(cfg, cut_range=[cfg.num_inference_steps - 1] * 2)


def calls(cfg: StepConfig) -> tuple[int, int]:
    return cfg.num_inference_steps, cfg.draft_lv_n


register_grad_method("draft_lv", GradMethod(run, WHOLE_CALLS, {"draft_lv_n": check_draft_lv_n},
                                            BenchSpec(pin, calls, unet_granularities(WHOLE_CALLS))))
