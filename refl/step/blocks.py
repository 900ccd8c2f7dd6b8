"""The building blocks every gradient method and reward_step share: the guided noise prediction, a UNet call
with gradient under the checkpointing policy, a sampler step, the base model, start noise, decoding, and
the denoising regulariser."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refl import conditioning
from refl.components import SDComponents
from refl.conditioning import Conditioning
from refl.counting import PhaseTimer


def scheduler_step(scheduler, eps, t, latents, generator, eta):
    """`scheduler.step` with the generator, and eta where the sampler has it (DDIM's knob; DDPM has none)."""
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
    adapted = [m for m in (components.unet,
                           *components.text_encoders().values()) if getattr(m, "peft_config", None)]
    for module in adapted:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in adapted:
            module.enable_adapters()


def guided_eps(components: SDComponents, latents, t, cond: Conditioning, uncond: Conditioning | None,
               guidance_scale: float) -> torch.Tensor:
    """The UNet's noise prediction, with classifier-free guidance when guidance_scale > 1."""
    unet = components.unet
    if guidance_scale > 1.0:
        x = torch.cat([latents, latents])  # (2B, C, h, w): unconditional half first
        out = unet(x, t, **conditioning.cat(uncond, cond).unet_kwargs()).sample  # (2B, C, h, w)
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + guidance_scale * (e_cond - e_uncond)  # (B, C, h, w)
    return unet(latents, t, **cond.unet_kwargs()).sample  # (B, C, h, w)


def grad_call(components: SDComponents, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fn(*args)`, a UNet call with gradient. Under the "calls" policy only its inputs are kept and the
    whole call runs again in backward (its blocks are then not checkpointed, so it runs twice at most)."""
    if components.checkpointing.unet == "calls":
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def initial_latents(components: SDComponents, batch: int, scheduler,
                    generator: torch.Generator) -> torch.Tensor:
    """Start noise drawn on the CPU generator (same numbers on every device), then moved."""
    size = components.unet.config.sample_size
    shape = (batch, components.unet.config.in_channels, size, size)  # (B, C, h, w)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(components.unet.device) * scheduler.init_noise_sigma


def decode(components: SDComponents, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], differentiable (clamp as ReFL does). A VAE kept
    in fp32 under an fp16 base decodes outside autocast (SDXL's overflows in fp16)."""
    vae = components.vae
    with components.vae_autocast():
        # (B, 3, H, W) in ~[-1, 1]
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_images(components: SDComponents, images01: torch.Tensor, generator=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w) for the denoising regulariser."""
    vae = components.vae
    with torch.no_grad(), components.autocast(), components.vae_autocast():
        dist = vae.encode((images01 * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        return dist.sample(generator).float() * vae.config.scaling_factor  # (B, C, h, w)


def noised_and_target(components: SDComponents, latents0: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training scheduler's noised latents at timesteps t (B,) and what the UNet is trained to predict
    there: the noise, or v for v-prediction models. Every denoising loss (the regulariser, preference
    tuning's errors) reads both here."""
    sched = components.scheduler
    noisy = sched.add_noise(latents0, noise, t)  # (B, C, h, w)
    if sched.config.prediction_type == "v_prediction":
        return noisy, sched.get_velocity(latents0, noise, t)  # (B, C, h, w)
    return noisy, noise


def denoising_loss(components: SDComponents, latents0: torch.Tensor, captions: Sequence[str],
                   generator: torch.Generator) -> torch.Tensor:
    """The pre-training loss on clean latents: MSE between the UNet output and the noise (or v) target."""
    sched = components.scheduler
    b = latents0.shape[0]
    noise = torch.randn(latents0.shape, generator=generator).to(latents0.device)  # (B, C, h, w)
    # (B,)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(latents0.device)
    noisy, target = noised_and_target(components, latents0, noise, t)  # (B, C, h, w) each
    cond = conditioning.encode(components, captions)  # the text encoders are not checkpointed

    def unet(x, t, cond):
        return components.unet(x, t, **cond.unet_kwargs()).sample

    pred = grad_call(components, unet, noisy, t, cond)  # (B, C, h, w), its one call with gradient
    return F.mse_loss(pred.float(), target.float())
