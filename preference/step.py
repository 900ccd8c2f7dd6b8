"""One micro-batch of preference tuning: images to latents (the VAE), one timestep and noise per example
(shared by the two images of a DPO pair), the tuned model's and the reference's denoising errors, the loss
(preference/objectives.py). The caller runs backward and the optimizer (train.py).

The reference is the base model itself: the LoRA adapters switched off (`refl.step.base_weights`, peft's
disable_adapters) for a no-grad pass, so no second copy of the denoiser is held. Text encoders that carry
adapters are switched off for the reference's text too.

Every family runs the same objectives; only the per-example error is the family's own
(`refl.step.noised_and_target`, `refl.step.denoiser_output`): the UNets at a timestep uniform over the DDPM
schedule, target the noise (or v); the flow models (SD 3, FLUX) at sigma drawn as their trainers draw it
(`refl.step.flow_training_timesteps`), x_sigma = (1 - sigma) x0 + sigma noise, target the velocity
noise - x0, FLUX's transformer reading the guidance scale as its embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from preference.objectives import dpo_loss, implicit_reward, kto_loss, kto_reference_point
from refl import conditioning
from refl.components import SDComponents
from refl.conditioning import Conditioning
from refl.step import base_weights, denoiser_output, encode_images, flow_training_timesteps, noised_and_target

ReduceSum = Callable[[torch.Tensor], torch.Tensor]  # a sum over processes (identity in one process)


def denoising_errors(components: SDComponents, latents0: torch.Tensor, cond: Conditioning,
                     noise: torch.Tensor, t: torch.Tensor, guidance_scale: float = 1.0) -> torch.Tensor:
    """Per-example mean over the latent's elements of (denoiser prediction - target)^2, the target being the
    noise or v, or a flow model's velocity (refl.step.noised_and_target); latents0 and noise (B, C, h, w),
    t (B,) -> (B,). FLUX reads `guidance_scale` as its embedding; the others make one conditional pass."""
    noisy, target = noised_and_target(components, latents0, noise, t)  # (B, C, h, w) each
    pred = denoiser_output(components, noisy, t, cond, guidance_scale)  # (B, C, h, w)
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)


def _text_adapted(components: SDComponents) -> bool:
    return any(getattr(m, "peft_config", None) for m in components.text_encoders().values())


def tuned_and_reference_errors(components: SDComponents, latents0: torch.Tensor, prompts: Sequence[str],
                               noise: torch.Tensor, t: torch.Tensor,
                               guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) errors of the tuned model (with gradient where grad is enabled) and of the base model (adapters
    off, no gradient), at the same latents, noise and timesteps (and FLUX's guidance scale)."""
    cond = conditioning.encode(components, prompts)
    errors = denoising_errors(components, latents0, cond, noise, t, guidance_scale)  # (B,)
    with torch.no_grad(), base_weights(components):
        ref_cond = conditioning.encode(components, prompts) if _text_adapted(components) else cond
        ref_errors = denoising_errors(components, latents0, ref_cond, noise, t, guidance_scale)  # (B,)
    return errors, ref_errors


def draw_noise(components: SDComponents, latents0: torch.Tensor, generator: torch.Generator,
               timestep_density: str = "logit_normal") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise like latents0 (B, C, h, w) and timesteps (B,), drawn on the CPU generator (the same numbers on
    every device) and moved: uniform over the DDPM schedule for the UNets, for a flow model sigma *
    num_train_timesteps with sigma from `timestep_density` (refl.step.flow_training_timesteps)."""
    b = latents0.shape[0]
    noise = torch.randn(latents0.shape, generator=generator).to(latents0.device)  # (B, C, h, w)
    if components.is_flow:
        return noise, flow_training_timesteps(components, b, generator, timestep_density).to(latents0.device)
    steps = components.scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (b,), generator=generator).to(latents0.device)  # (B,)
    return noise, t


def dpo_step(components: SDComponents, batch: dict, beta: float, generator: torch.Generator,
             timestep_density: str = "logit_normal", guidance_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Diffusion-DPO on a micro-batch of B pairs (batch: prompt, pos, neg (B, 3, S, S) in [0, 1], label,
    weight); both images of a pair share its timestep and noise, as the objective needs. `timestep_density`
    and `guidance_scale` are the flow families' (draw_noise, denoising_errors)."""
    device = components.denoiser.device
    with components.autocast():
        images = torch.cat([batch["pos"], batch["neg"]]).to(device)  # (2B, 3, S, S): preferred first
        latents = encode_images(components, images, generator)  # (2B, C, h, w)
        noise, t = draw_noise(components, latents[: len(batch["prompt"])], generator,
                              timestep_density)  # (B, C, h, w), (B,)
        errors, ref_errors = tuned_and_reference_errors(components, latents, list(batch["prompt"]) * 2,
                                                        torch.cat([noise, noise]), torch.cat([t, t]),
                                                        guidance_scale)  # (2B,) each
    e_w, e_l = errors.chunk(2)  # (B,) each
    r_w, r_l = ref_errors.chunk(2)  # (B,) each
    return dpo_loss(e_w, e_l, r_w, r_l, beta, batch["label"].to(device), batch["weight"].to(device))


def kto_step(components: SDComponents, batch: dict, beta: float, desirable_weight: float,
             undesirable_weight: float, generator: torch.Generator,
             reduce_sum: ReduceSum = lambda x: x, timestep_density: str = "logit_normal",
             guidance_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Diffusion-KTO on a micro-batch of B >= 2 labelled images (batch: prompt, image (B, 3, S, S), label
    (B,) 1 liked / 0 not, weight). The reference point is estimated on mismatched pairs, image i with the
    prompt of image i + 1 (cyclically), at the same noise and timestep, without gradient; `reduce_sum`
    adds its sums up over processes (a collective: every process calls it once per micro-batch, see
    `join_reference_point`). `timestep_density` and `guidance_scale` are the flow families'."""
    device = components.denoiser.device
    prompts = list(batch["prompt"])
    with components.autocast():
        latents = encode_images(components, batch["image"].to(device), generator)  # (B, C, h, w)
        noise, t = draw_noise(components, latents, generator, timestep_density)  # (B, C, h, w), (B,)
        errors, ref_errors = tuned_and_reference_errors(components, latents, prompts, noise, t,
                                                        guidance_scale)  # (B,) each
        with torch.no_grad():
            kl_e, kl_r = tuned_and_reference_errors(components, latents, prompts[1:] + prompts[:1], noise, t,
                                                    guidance_scale)  # (B,) each
    kl = implicit_reward(kl_e, kl_r, beta)  # (B,)
    sums = reduce_sum(torch.stack([kl.sum(), torch.tensor(float(len(kl)), device=kl.device)]))  # (2,)
    z0 = kto_reference_point(sums[0], sums[1])
    return kto_loss(errors, ref_errors, batch["label"].to(device), z0, beta, desirable_weight,
                    undesirable_weight, batch["weight"].to(device))


def join_reference_point(reduce_sum: ReduceSum, device) -> None:
    """A process whose KTO micro-batch had no good row (on_bad_row=skip) still joins the reference point's
    sum over processes, adding nothing, so the others are not left waiting."""
    reduce_sum(torch.zeros(2, device=device))
