"""Direct-Align (refl/step/methods/direct_align.py), the method added through the gradient-method contract
alone: the recovery formula pinned on every family's scheduler (a model that predicts the exact velocity or
noise recovers the image; the SRPO paper's flow form by hand), and one step on tiny-sd3 and tiny-flux in bf16
whose every LoRA module gets a finite, non-zero gradient."""

from __future__ import annotations

import pytest
import torch
from helpers.lora import randomise_lora_b
from helpers.training import PROMPTS

from refl.components import load_components
from refl.lora import LoraConfig, add_lora
from refl.sampling import make_scheduler
from refl.step import GRAD_METHODS, StepConfig, StepContext, reward_step
from refl.step.blocks import set_timesteps
from refl.step.methods.direct_align import direct_align

torch.set_num_threads(1)

T = 5


def _context(name: str, scheduler: str) -> StepContext:
    """A StepContext over the model's own trajectory of T steps; its denoiser is set by each test."""
    components = load_components(name)
    sched = make_scheduler(scheduler, components)
    set_timesteps(components, sched, T)
    cfg = StepConfig(method="direct_align", scheduler=scheduler, num_inference_steps=T)
    return StepContext(components, cfg, sched, None, None, torch.Generator().manual_seed(0), None)


def _pair(shape):
    g = torch.Generator().manual_seed(1)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # x0, the known noise


@pytest.mark.parametrize("name,scheduler", [("tiny-sd3", "flow_euler"), ("tiny-flux", "flow_euler"),
                                            ("tiny", "ddim"), ("tiny", "ddpm"), ("tiny-v", "ddim")])
def test_an_exact_denoiser_recovers_the_image_at_every_level(name, scheduler):
    ctx = _context(name, scheduler)
    c = ctx.components
    x0, noise = _pair((2, c.latent_channels, c.latent_size, c.latent_size))
    sched = ctx.scheduler
    v_pred = sched.config.get("prediction_type") == "v_prediction"

    def exact(xt, t):  # what a perfect model outputs at xt = a x0 + s noise
        if c.is_flow:
            return noise - x0  # the path's velocity
        if v_pred:
            return sched.get_velocity(x0, noise, t.reshape(1))
        return noise

    ctx.grad_eps = exact
    for cut in range(T):
        torch.testing.assert_close(direct_align(ctx, x0, noise, cut), x0, rtol=0, atol=1e-4)
    # a wrong prediction is not "recovered" into x0
    ctx.grad_eps = lambda xt, t: exact(xt, t) + 0.5
    assert (direct_align(ctx, x0, noise, 1) - x0).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_the_flow_recovery_is_the_papers_formula(name):
    """x_t = (1 - sigma) x0 + sigma noise; one Euler step to sigma' with the model's velocity v; the image
    recovered as (x_{sigma'} - sigma' noise) / (1 - sigma'); at the last level, x_t - sigma v."""
    ctx = _context(name, "flow_euler")
    c = ctx.components
    x0, noise = _pair((2, c.latent_channels, c.latent_size, c.latent_size))
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))  # any velocity
    ctx.grad_eps = lambda xt, t: v
    sigmas = ctx.scheduler.sigmas
    for cut in range(T):
        s, s_next = float(sigmas[cut]), float(sigmas[cut + 1])
        xt = (1 - s) * x0 + s * noise
        by_hand = (xt + (s_next - s) * v - s_next * noise) / (1 - s_next)
        torch.testing.assert_close(direct_align(ctx, x0, noise, cut), by_hand, rtol=0, atol=1e-5)
    assert float(sigmas[T]) == 0.0  # so the last level's recovery is the one-step x0, x_t - sigma v


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_direct_align_trains_every_lora_module_in_bf16(name):
    components = load_components(name).to(dtype=torch.bfloat16)
    add_lora(components, LoraConfig(rank=2, alpha=4.0))
    randomise_lora_b(components, seed=3)  # B = 0 would leave every A without gradient
    params = {n: p for n, p in components.transformer.named_parameters() if "lora_" in n}
    assert "direct_align" in GRAD_METHODS
    cfg = StepConfig(method="direct_align", scheduler="flow_euler", num_inference_steps=4, cut_range=[0, 3],
                     guidance_scale=3.0, grad_scale=1.0)
    out = reward_step(components, PROMPTS[:2], lambda images, prompts: images.mean(dim=(1, 2, 3)), cfg,
                      torch.Generator().manual_seed(1))
    assert torch.isfinite(out["loss"]) and 0 <= int(out["cut"]) <= 3
    out["loss"].backward()
    bad = [n for n, p in params.items()
           if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not bad, bad
