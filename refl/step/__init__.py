"""One reward-gradient step on Stable Diffusion: ReFL and its relatives.

`reward_step(components, prompts, reward_fn, cfg, generator)` samples latents, takes the gradient
through the part of the chain that `cfg.method` names, decodes with gradient, scores with
`reward_fn(images01 (B, 3, H, W), prompts) -> (B,)` and returns named loss terms; the caller
runs backward and the optimizer (train.py), so gradient accumulation and mixed precision stay there.

Layout: `config` (StepConfig), `contract` (StepContext, MethodResult, GradMethod, the registry
GRAD_METHODS), `blocks` (what methods and the step share), `methods/` (one module per gradient method,
each registering itself) and, here, `reward_step`. Shipped methods (each module's docstring says what
it does): `refl` (ImageReward's ReFL), `draft` (DRaFT-K), `draft_lv` (DRaFT-LV), `alignprop`
(AlignProp-style truncation) and `direct_align` (Direct-Align, the SRPO paper's). reward_step refuses a
result that is not a MethodResult, a cut outside the trajectory or a method that made no call with
gradient.

Loss: relu(margin - reward).mean() * grad_scale, plus two optional regularisers:
- `reg_weight` x the pre-training denoising MSE on a batch of clean latents (ImageReward's paper);
- `kl_weight` x the mean squared difference between the tuned and the base model's noise
  predictions at every step that has gradient. For two Gaussian sampler steps with the same variance
  the KL divergence is proportional to the squared difference of their means, i.e. of the noise
  predictions, so this bounds how far each step with gradient moves from the base model (DPOK's KL
  term, evaluated on the states the method visits). One extra UNet call per step, without gradient.
Every UNet call reads its text through refl.conditioning: for SDXL both encoders' hidden states, the
pooled embedding and the size conditioning (add_time_ids), as the stock StableDiffusionXLPipeline
computes them. v-prediction models (SD 2.x) need nothing of their own: the schedulers' `step` turns the
UNet's v into x0, and the denoising regulariser's target is v for them.
Flow-matching models (SD 3, FLUX; refl.step.blocks): the model's own FlowMatchEulerDiscreteScheduler (its
shift), the cut range indexes its steps, x0 = x_t - sigma * v, the KL term compares velocities and the
regulariser's target is the velocity noise - x0. SD 3 takes classifier-free guidance with a negative pass,
FLUX its guidance scale as an embedding (one pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from refl import conditioning
from refl.components import SDComponents
from refl.counting import PhaseTimer
from refl.sampling import make_scheduler
from refl.step import methods  # noqa: F401  (importing it registers the shipped methods)
from refl.step.blocks import (
    FLOW_TIMESTEP_DENSITIES,
    base_weights,
    decode,
    denoiser_output,
    denoising_loss,
    encode_images,
    flow_training_timesteps,
    grad_call,
    initial_latents,
    noised_and_target,
    phase,
    set_timesteps,
)
from refl.step.config import SHARED_KNOBS, StepConfig, check_cut_range
from refl.step.contract import (
    GRAD_METHODS,
    WHOLE_CALLS,
    BenchSpec,
    GradMethod,
    MethodResult,
    StepContext,
    checkpointing_for,
    grad_method,
    ignored_knobs,
    register_grad_method,
    unet_granularities,
    validate_step_config,
)

__all__ = ["FLOW_TIMESTEP_DENSITIES", "GRAD_METHODS", "SHARED_KNOBS", "WHOLE_CALLS", "BenchSpec",
           "GradMethod", "MethodResult", "NonFiniteLossError", "RewardFn", "StepConfig", "StepContext",
           "base_weights", "check_cut_range", "checkpointing_for", "decode", "denoiser_output",
           "denoising_loss", "encode_images", "flow_training_timesteps", "grad_call", "grad_method",
           "ignored_knobs", "initial_latents", "noised_and_target", "register_grad_method", "reward_step",
           "unet_granularities", "validate_step_config"]

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or inf; raised before backward, so no optimizer update happens."""


def _checked(cfg: StepConfig, result, ctx: StepContext) -> MethodResult:
    """The method's result, refused here with the method's name rather than deep in the loss."""
    name = f"gradient method {cfg.method!r}"
    if not isinstance(result, MethodResult):
        raise TypeError(f"{name} returned {type(result).__name__}, not a refl.step.MethodResult")
    if not result.predictions:
        raise ValueError(f"{name} returned no predictions to score")
    if ctx.grad_calls == 0:
        raise ValueError(f"{name} made no UNet call through StepContext.grad_eps, so nothing trains (and "
                         "neither checkpointing nor the KL term would see a call made another way)")
    if not 0 <= result.cut < cfg.num_inference_steps:
        raise ValueError(f"{name} returned cut={result.cut}, outside [0, "
                         f"num_inference_steps={cfg.num_inference_steps})")
    return result


def reward_step(
    components: SDComponents,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    cfg: StepConfig,
    generator: torch.Generator,
    reg_batch: tuple[torch.Tensor, Sequence[str]] | None = None,
    step_name: str = "step",
    timer: PhaseTimer | None = None,
) -> dict[str, torch.Tensor]:
    """One reward-gradient forward pass; returns {"loss" (with grad), "reward_loss", "reward", ...}.

    reg_batch: (clean scaled latents (B', C, h, w), captions) for the denoising regulariser, used
    when cfg.reg_weight > 0. Raises NonFiniteLossError (naming `step_name`) on a NaN/inf loss.
    """
    with components.autocast():
        return _reward_step(components, prompts, reward_fn, cfg, generator, reg_batch, step_name, timer)


def _reward_step(components, prompts, reward_fn, cfg, generator, reg_batch, step_name, timer):
    validate_step_config(cfg)
    scheduler = make_scheduler(cfg.scheduler, components)
    set_timesteps(components, scheduler, cfg.num_inference_steps)
    with phase(timer, "text"):
        cond = conditioning.encode(components, prompts)  # hidden states (B, L, D), SDXL's pooled and sizes
        # FLUX reads the scale as an embedding and has no negative
        guided = cfg.guidance_scale > 1 and not components.guidance_embedded
        uncond = conditioning.negative(components, cond) if guided else None
    base_cond = None
    if cfg.kl_weight > 0 and any(getattr(m, "peft_config", None)
                                 for m in components.text_encoders().values()):
        with torch.no_grad(), base_weights(components):  # the base model reads the base text encoders
            base = conditioning.encode(components, prompts)
            base_cond = (base, conditioning.negative(components, base) if uncond is not None else None)
    ctx = StepContext(components, cfg, scheduler, cond, uncond, generator, timer, base_cond)
    latents = initial_latents(components, len(prompts), scheduler, generator)  # (B, C, h, w)
    result = _checked(cfg, GRAD_METHODS[cfg.method].run(ctx, latents), ctx)

    rewards = []
    reward_terms: dict[str, list[torch.Tensor]] = {}
    for x0 in result.predictions:
        with phase(timer, "decode"):
            images = decode(components, x0)  # (B, 3, H, W) in [0, 1]
        with phase(timer, "critic"):
            r = reward_fn(images, list(prompts))  # (B,)
        if r.shape != (len(prompts),):
            raise ValueError(f"reward_fn returned shape {tuple(r.shape)}, expected ({len(prompts)},)")
        rewards.append(r.float())
        # A weighted mix (refl.mix.WeightedRewards) exposes its unweighted terms, (B,) each, for logging.
        for name, term in (getattr(reward_fn, "last_terms", None) or {}).items():
            reward_terms.setdefault(name, []).append(term.detach().float())
    reward = torch.stack(rewards)  # (n, B): n = 1 except for DRaFT-LV
    reward_loss = F.relu(cfg.reward_margin - reward).mean() * cfg.grad_scale
    out = {"reward_loss": reward_loss, "reward": reward.detach().mean(), "reward_std": reward.detach().std()
           if reward.numel() > 1 else torch.zeros(()), "cut": torch.tensor(float(result.cut))}
    out.update({f"reward/{name}": torch.stack(terms).mean() for name, terms in reward_terms.items()})
    loss = reward_loss
    if cfg.reg_weight > 0:
        if reg_batch is None:
            raise ValueError("reg_weight > 0 but no reg_batch (clean latents, captions) was given")
        reg = denoising_loss(components, reg_batch[0], reg_batch[1], generator, cfg.guidance_scale)
        out["reg_loss"] = reg.detach()
        loss = loss + cfg.reg_weight * reg
    if cfg.kl_weight > 0:
        kl = torch.stack(ctx.kl_terms).mean()
        out["kl_loss"] = kl.detach()
        loss = loss + cfg.kl_weight * kl
    out["loss"] = loss
    if not torch.isfinite(loss.detach()).all():
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k != "loss" and v.numel() == 1)
        raise NonFiniteLossError(
            f"{step_name}: loss is {loss.item()} ({terms}); stopped before backward, no optimizer update was "
            "made. Check the reward (does the critic give NaN?), lower train.lr, or use bf16 instead of "
            "fp16.")
    return out
