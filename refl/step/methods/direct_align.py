"""Direct-Align (Shen et al. 2025, "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human
Preference", the SRPO paper): sample the image x0 without gradient, noise it to a level drawn from
`cut_range` with a known noise (the trajectory's own start noise, as the paper's online variant does), take
one denoising step with gradient to the trajectory's next level, and recover the image from that state by
removing the known noise there; decode, reward.

The scheduler's noising at a timestep, x_t = a x0 + s noise, defines the levels: a flow model's a = 1 - sigma,
s = sigma; a UNet model's DDPM form a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar). With the model's x0
prediction x0_hat at x_t (the scheduler's `pred_original_sample`) and the noise it implies, eps_hat =
(x_t - a x0_hat) / s, the deterministic step to the next level (a', s') is x' = a' x0_hat + s' eps_hat (a flow
model's Euler step x_t + (sigma' - sigma) v; DDIM's at eta 0), and the image is recovered as

    x0_rec = (x' - s' noise) / a'.

A model that predicts the exact velocity (or noise) recovers x0 itself. After the trajectory's last level
(a' = 1, s' = 0) the recovery is the one-step x0_hat, ReFL's prediction. The paper's offline variant (real
images instead of samples) and its reward weighting over levels are not part of this method.
"""

from __future__ import annotations

from dataclasses import replace

import torch

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


def level(ctx: StepContext, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s), each (1, 1, 1, 1), with the scheduler's x_t = a x0 + s noise at timestep `t`: read off its
    own noising (linear in x0 and noise), so that every family's form is the scheduler's."""
    one = torch.ones((1, 1, 1, 1), device=like.device, dtype=torch.float32)
    zero = torch.zeros_like(one)
    return ctx.add_noise(one, zero, t).float(), ctx.add_noise(zero, one, t).float()


def recover(x0_hat: torch.Tensor, xt: torch.Tensor, noise: torch.Tensor, at: tuple,
            to: tuple) -> torch.Tensor:
    """The image recovered from one step of the model at `xt` (B, C, h, w), noised with the known `noise` at
    level `at` = (a, s), to level `to` = (a', s'), given the model's x0 prediction `x0_hat` (B, C, h, w)."""
    (a, s), (a_next, s_next) = at, to
    eps_hat = (xt - a * x0_hat) / s  # (B, C, h, w), the noise the model's x0 implies
    x_next = a_next * x0_hat + s_next * eps_hat  # the deterministic step to the next level
    return (x_next - s_next * noise) / a_next  # (B, C, h, w)


def direct_align(ctx: StepContext, x0: torch.Tensor, noise: torch.Tensor, cut: int) -> torch.Tensor:
    """x0 (B, C, h, w, no gradient) noised with `noise` to the level of step `cut`, one call with gradient,
    the image recovered at the next level (B, C, h, w)."""
    timesteps = ctx.timesteps
    t = timesteps[cut]
    at = level(ctx, t, x0)
    nxt = (level(ctx, timesteps[cut + 1], x0) if cut + 1 < len(timesteps)
           else (torch.ones_like(at[0]), torch.zeros_like(at[1])))  # after the last level: the clean image
    xt = ctx.add_noise(x0, noise, t)  # (B, C, h, w), the known noise injected
    eps = ctx.grad_eps(xt, t)  # (B, C, h, w)
    x0_hat = ctx.step(eps, t, xt).pred_original_sample.float()  # (B, C, h, w)
    return recover(x0_hat, xt.float(), noise.float(), at, nxt)


def run(ctx: StepContext, latents) -> MethodResult:
    """The whole trajectory without gradient from `latents` (its start noise is the known noise), then
    Direct-Align at the level of a cut drawn from cut_range."""
    noise = latents / getattr(ctx.scheduler, "init_noise_sigma", 1.0)  # (B, C, h, w)
    x0 = ctx.run_no_grad(latents, ctx.timesteps)  # (B, C, h, w), the sampled image
    cut = ctx.draw_cut()
    with phase(ctx.timer, "grad_step"):
        x0_rec = direct_align(ctx, x0, noise, cut)
    return MethodResult([x0_rec], cut)


def pin(cfg: StepConfig) -> StepConfig:
    """Every level costs the same (the whole trajectory, then one call); the last keeps the memory model's
    shortened trajectory ending on the gradient path."""
    return replace(cfg, cut_range=[cfg.num_inference_steps - 1] * 2)


def calls(cfg: StepConfig) -> tuple[int, int]:
    return cfg.num_inference_steps, 1


register_grad_method("direct_align", GradMethod(run, WHOLE_CALLS, {"cut_range": check_cut_range},
                                                BenchSpec(pin, calls, unet_granularities(WHOLE_CALLS))))
