"""The building blocks every gradient method and reward_step share: one conditional denoiser pass of any
family and the guided model output, a denoiser call with gradient under the checkpointing policy, the
trajectory's timesteps, a sampler step, re-noising, the base model, start noise, decoding, and what every
denoising loss shares (the regulariser here, preference tuning's errors): the training noising and target,
and a flow model's training timesteps.

Flow-matching models (SD 3, FLUX) predict a velocity v on the path x_t = (1 - sigma) x0 + sigma noise, so
v = noise - x0 and x0 = x_t - sigma v. Their timesteps are the model's own FlowMatchEulerDiscreteScheduler's,
set as its stock pipeline sets them (SD 3: the scheduler's shift; FLUX: its sigmas and the shift mu for the
image's token count). Their sampler step is that scheduler's Euler step, x_{next} = x_t + (sigma_next -
sigma) v, computed here from the scheduler's sigmas: the scheduler's own `step` keeps a step counter, and
the methods step, re-noise and step again at one timestep. FLUX's transformer reads 2x2-packed latents and
its guidance scale as an embedding; the latents stay (B, C, h, w) everywhere else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refl import conditioning
from refl.components import SDComponents
from refl.conditioning import Conditioning
from refl.counting import PhaseTimer


@dataclass
class FlowStep:
    """A flow-matching sampler step, with the fields of diffusers' scheduler outputs the methods read."""

    prev_sample: torch.Tensor  # (B, C, h, w) x at the next sigma
    pred_original_sample: torch.Tensor  # (B, C, h, w) x0 = x_t - sigma * v


def _is_flow_scheduler(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def flow_sigma(scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigma of timestep `t` of the scheduler's trajectory and the next one (0 after the last)."""
    i = scheduler.index_for_timestep(t)
    return scheduler.sigmas[i], scheduler.sigmas[i + 1]


def flow_step(scheduler, v, t, latents) -> FlowStep:
    """The FlowMatchEulerDiscreteScheduler's deterministic Euler step from `latents` (B, C, h, w) at `t`
    given the velocity `v`, and its x0; differentiable, stateless."""
    sigma, sigma_next = flow_sigma(scheduler, t)
    latents = latents.float()
    return FlowStep(latents + (sigma_next - sigma) * v, latents - sigma * v)  # (B, C, h, w) each


def set_timesteps(components: SDComponents, scheduler, num_inference_steps: int) -> None:
    """The trajectory's timesteps, as the family's stock pipeline sets them."""
    device = components.denoiser.device
    if not components.is_flow:
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    size = components.latent_size
    kwargs = {}
    if components.family == "flux":  # sigmas 1 .. 1/T; the image's tokens are its 2x2 patches
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        tokens = (size // 2) ** 2
    else:
        patch = components.transformer.config.patch_size
        tokens = (size // patch) ** 2
    if config.get("use_dynamic_shifting", False):
        kwargs["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
    scheduler.set_timesteps(None if "sigmas" in kwargs else num_inference_steps, device=device, **kwargs)


def scheduler_step(scheduler, eps, t, latents, generator, eta):
    """`scheduler.step` with the generator, and eta where the sampler has it (DDIM's knob; DDPM has none);
    a flow scheduler's Euler step (`flow_step`)."""
    if _is_flow_scheduler(scheduler):
        return flow_step(scheduler, eps, t, latents)
    kwargs = {"generator": generator, "return_dict": True}
    if "eta" in inspect.signature(scheduler.step).parameters:
        kwargs["eta"] = eta
    return scheduler.step(eps, t, latents, **kwargs)


@contextmanager
def phase(timer: PhaseTimer | None, name: str):
    """Time the block as phase `name` when a benchmark passed a timer."""
    if timer is None:
        yield
    else:
        with timer(name):
            yield


@contextmanager
def base_weights(components: SDComponents):
    """Run the base model: LoRA adapters of the UNet and (where attached) the text encoders are off inside."""
    adapted = [m for m in (components.denoiser,
                           *components.text_encoders().values()) if getattr(m, "peft_config", None)]
    for module in adapted:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in adapted:
            module.enable_adapters()


def model_input(scheduler, latents, t):
    """The denoiser's input at `t`: the scheduler's input scaling where it has one (flow schedulers have
    none)."""
    if hasattr(scheduler, "scale_model_input"):
        return scheduler.scale_model_input(latents, t)
    return latents


def add_noise(scheduler, x0, noise, t):
    """`x0` (B, C, h, w) noised to the single timestep `t` of the scheduler's trajectory."""
    if _is_flow_scheduler(scheduler):
        return scheduler.scale_noise(x0, t.reshape(1), noise)  # (1 - sigma) x0 + sigma noise
    return scheduler.add_noise(x0, noise, t.reshape(1))


def flow_output(components: SDComponents, latents, t, cond: Conditioning, guidance_scale: float):
    """A flow transformer's velocity (B, C, h, w) at `latents` (B, C, h, w), `t` (a scheduler timestep, or one
    per sample), called as its stock pipeline calls it."""
    transformer = components.transformer
    b = latents.shape[0]
    t = t.expand(b) if t.dim() == 0 else t  # (B,)
    if components.family == "sd3":
        return transformer(hidden_states=latents, timestep=t, encoder_hidden_states=cond.hidden,
                           pooled_projections=cond.pooled).sample
    from diffusers import FluxPipeline

    _, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)  # (B, h/2 * w/2, 4C)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    guidance = torch.full((b,), guidance_scale, device=latents.device, dtype=torch.float32)
    out = transformer(hidden_states=packed, timestep=t.to(latents.dtype) / 1000, guidance=guidance,
                      pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden,
                      txt_ids=cond.text_ids, img_ids=image_ids).sample  # (B, h/2 * w/2, 4C)
    scale = components.vae_scale
    return FluxPipeline._unpack_latents(out, h * scale, w * scale, scale)  # (B, C, h, w)


def denoiser_output(components: SDComponents, latents, t, cond: Conditioning,
                    guidance_scale: float = 1.0) -> torch.Tensor:
    """One conditional pass of the denoiser: the UNet's noise or v, a flow transformer's velocity, (B, C, h,
    w); FLUX reads `guidance_scale` as its guidance embedding, the others ignore it (no negative pass)."""
    if components.is_flow:
        return flow_output(components, latents, t, cond, guidance_scale)  # (B, C, h, w)
    return components.unet(latents, t, **cond.unet_kwargs()).sample  # (B, C, h, w)


def guided_eps(components: SDComponents, latents, t, cond: Conditioning, uncond: Conditioning | None,
               guidance_scale: float) -> torch.Tensor:
    """The denoiser's output (noise, v or a flow model's velocity), with classifier-free guidance when
    guidance_scale > 1 (FLUX: the guidance scale as its embedding, one pass)."""
    if components.guidance_embedded or guidance_scale <= 1.0:
        return denoiser_output(components, latents, t, cond, guidance_scale)  # (B, C, h, w)
    x = torch.cat([latents, latents])  # (2B, C, h, w): unconditional half first
    out = denoiser_output(components, x, t, conditioning.cat(uncond, cond), guidance_scale)  # (2B, C, h, w)
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond)  # (B, C, h, w)


def grad_call(components: SDComponents, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fn(*args)`, a UNet call with gradient. Under the "calls" policy only its inputs are kept and the
    whole call runs again in backward (its blocks are then not checkpointed, so it runs twice at most)."""
    if components.checkpointing.unet == "calls":
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def initial_latents(components: SDComponents, batch: int, scheduler,
                    generator: torch.Generator) -> torch.Tensor:
    """Start noise drawn on the CPU generator (same numbers on every device), then moved (a flow model's
    trajectory starts at sigma 1: the noise itself)."""
    if components.is_flow:
        shape = (batch, components.latent_channels, components.latent_size, components.latent_size)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(components.denoiser.device)
    size = components.unet.config.sample_size
    shape = (batch, components.unet.config.in_channels, size, size)  # (B, C, h, w)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(components.unet.device) * scheduler.init_noise_sigma


def decode(components: SDComponents, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], differentiable (clamp as ReFL does). A VAE kept
    in fp32 under an fp16 base decodes outside autocast (SDXL's overflows in fp16)."""
    vae = components.vae
    shift = getattr(vae.config, "shift_factor", None)  # SD 3's and FLUX's VAEs
    with components.vae_autocast():
        z = latents.to(vae.dtype) / vae.config.scaling_factor  # (B, C, h, w)
        images = vae.decode(z if shift is None else z + shift).sample  # (B, 3, H, W) in ~[-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_images(components: SDComponents, images01: torch.Tensor, generator=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w) for the denoising regulariser."""
    vae = components.vae
    with torch.no_grad(), components.autocast(), components.vae_autocast():
        dist = vae.encode((images01 * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator).float()  # (B, C, h, w)
        shift = getattr(vae.config, "shift_factor", None)  # SD 3's and FLUX's VAEs
        return (z if shift is None else z - shift) * vae.config.scaling_factor


# How a flow model's training timesteps are drawn (`flow_training_timesteps`): the density of u in (0, 1)
# that picks the training scheduler's sigma, as diffusers' SD 3 / FLUX trainers name them.
FLOW_TIMESTEP_DENSITIES = ("logit_normal", "uniform")


def flow_training_timesteps(components: SDComponents, batch: int, generator: torch.Generator,
                            density: str) -> torch.Tensor:
    """(B,) timesteps of a flow model's training schedule, t = sigma * num_train_timesteps (the units its
    transformer reads), drawn on the CPU generator and moved to the denoiser's device, as diffusers' SD 3 and
    FLUX LoRA trainers draw them: u from `density` (logit_normal: sigmoid of N(0, 1), the SD 3 paper's best
    rectified-flow sampler and the trainers' default; uniform), then the training scheduler's sigma at index
    u * num_train_timesteps. That scheduler carries SD 3's static shift (3.0: more high-noise sigmas) and
    none for FLUX, whose shift depends on the image size and is applied only at sampling."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if density not in FLOW_TIMESTEP_DENSITIES:
        raise ValueError(f"flow timestep density {density!r}; choose one of {FLOW_TIMESTEP_DENSITIES}")
    # A fresh copy: the components' scheduler may have had its sigmas set for sampling.
    sched = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config)
    u = compute_density_for_timestep_sampling(density, batch, logit_mean=0.0, logit_std=1.0,
                                              generator=generator)  # (B,) in (0, 1)
    index = (u * sched.config.num_train_timesteps).long()  # (B,)
    return sched.timesteps[index].to(components.denoiser.device)  # (B,) descending in index: 1000 .. 1


def noised_and_target(components: SDComponents, latents0: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training scheduler's noised latents at timesteps t (B,) and what the denoiser is trained to
    predict there: the noise, or v for v-prediction models; for a flow model (t = sigma *
    num_train_timesteps) x_sigma = (1 - sigma) x0 + sigma noise and the velocity noise - x0. Every denoising
    loss (the regulariser, preference tuning's errors) reads both here."""
    if components.is_flow:
        sigma = t.float() / components.scheduler.config.num_train_timesteps  # (B,)
        s = sigma.view(-1, *([1] * (latents0.dim() - 1)))  # (B, 1, 1, 1)
        return (1 - s) * latents0 + s * noise, noise - latents0  # (B, C, h, w) each
    sched = components.scheduler
    noisy = sched.add_noise(latents0, noise, t)  # (B, C, h, w)
    if sched.config.prediction_type == "v_prediction":
        return noisy, sched.get_velocity(latents0, noise, t)  # (B, C, h, w)
    return noisy, noise


def denoising_loss(components: SDComponents, latents0: torch.Tensor, captions: Sequence[str],
                   generator: torch.Generator, guidance_scale: float = 1.0) -> torch.Tensor:
    """The pre-training loss on clean latents: MSE between the denoiser's output and its target
    (`noised_and_target`) at a timestep drawn uniformly from the DDPM schedule, for a flow model at a sigma
    drawn uniformly from [0, 1) (FLUX reads `guidance_scale` as its embedding)."""
    b = latents0.shape[0]
    steps = components.scheduler.config.num_train_timesteps
    noise = torch.randn(latents0.shape, generator=generator).to(latents0.device)  # (B, C, h, w)
    if components.is_flow:
        t = torch.rand((b,), generator=generator).to(latents0.device) * steps  # (B,) sigma * steps
    else:
        t = torch.randint(0, steps, (b,), generator=generator).to(latents0.device)  # (B,)
    noisy, target = noised_and_target(components, latents0, noise, t)  # (B, C, h, w) each
    cond = conditioning.encode(components, captions)  # the text encoders are not checkpointed

    def denoiser(x, t, cond):
        return denoiser_output(components, x, t, cond, guidance_scale)

    pred = grad_call(components, denoiser, noisy, t, cond)  # (B, C, h, w), its one call with gradient
    return F.mse_loss(pred.float(), target.float())
