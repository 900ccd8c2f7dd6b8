"""DRaFT-K: sample to the end, gradient through the last K steps only (`draft_k`)."""

from __future__ import annotations

from dataclasses import replace

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
    """Sample to the end, gradient through the last K steps."""
    timesteps = ctx.timesteps
    k = ctx.cfg.draft_k
    latents = ctx.run_no_grad(latents, timesteps[: len(timesteps) - k])
    with phase(ctx.timer, "grad_step"):
        for t in timesteps[len(timesteps) - k :]:
            eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
            latents = ctx.step(eps, t, latents).prev_sample  # grad flows through the K steps
    return MethodResult([latents], len(timesteps) - k)


def check_draft_k(cfg: StepConfig) -> None:
    if not 1 <= cfg.draft_k <= cfg.num_inference_steps:
        raise ValueError(f"draft_k={cfg.draft_k} must be in [1, "
                         f"num_inference_steps={cfg.num_inference_steps}]")


def pin(cfg: StepConfig) -> StepConfig:
    """Its path is fixed by draft_k; the cut it reports is recorded."""
    return replace(cfg, cut_range=[cfg.num_inference_steps - cfg.draft_k] * 2)


def calls(cfg: StepConfig) -> tuple[int, int]:
    return cfg.num_inference_steps - cfg.draft_k, cfg.draft_k


register_grad_method("draft", GradMethod(run, WHOLE_CALLS, {"draft_k": check_draft_k},
                                         BenchSpec(pin, calls, unet_granularities(WHOLE_CALLS))))
