"""The one way this project draws images without gradient: a stock `StableDiffusionPipeline` call (for
SDXL a stock `StableDiffusionXLPipeline` call; `refl.components.build_pipeline` picks the class).

Training validation, the regulariser's base samples, the comparison harness, `generate.py` and the toy
world's pre-training report and community all call `sample`. The ReFL step keeps its own loop: it
needs the gradient through part of the trajectory, which a pipeline call cannot give.

Seeds: `seeds` gives every image its own CPU generator, so an image does not depend on the batch it
was drawn in; `generator` shares one generator across the call (drawn from in batch order), which is
what a training loop that reproduces a whole batch from one seed wants.

Text: `prompts`, or one prompt's embeddings from `encode_text` (the pipeline's own `encode_prompt`,
keyed by the pipeline's argument names, so SDXL's pooled embeddings travel with them).

Half precision: under fp16 autocast with a VAE kept in fp32 (refl.components: SDXL's VAE overflows in
fp16), the pipeline returns latents and the VAE decodes them outside autocast; the pipeline's own
decode would run the VAE's convolutions in fp16 under the caller's autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from refl.components import SDComponents, build_pipeline

OUTPUTS = ("latent", "pt", "uint8", "pil")


def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def _ddpm(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


SCHEDULERS: dict[str, Callable] = {"ddim": _ddim, "ddpm": _ddpm}
# `scheduler: model`: the sampler the model's own model_index.json names (SDXL base ships Euler), built from
# its scheduler/scheduler_config.json: what `DiffusionPipeline.from_pretrained` of that model samples with.
# DDPM for presets.
MODEL_SCHEDULER = "model"


def model_scheduler(components: SDComponents):
    """The scheduler the model's directory (or cached hub id) ships, as its stock pipeline loads it."""
    import diffusers

    source = components.source
    if source.startswith(("preset:", "random:")):
        return _ddpm(components.scheduler.config)
    # Both honour HF_HUB_OFFLINE (a hub id is read from the cache the model was loaded from).
    name = diffusers.DiffusionPipeline.load_config(source).get("scheduler", [None, None])[1]
    cls = getattr(diffusers, name or "", None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{source}: model_index.json names the scheduler {name!r}, which this diffusers "
                         f"does not have; set scheduler to one of {sorted(SCHEDULERS)}")
    return cls.from_config(cls.load_config(source, subfolder="scheduler"))


def make_scheduler(name: str, components: SDComponents):
    """A sampling scheduler sharing the model's noise schedule (betas, prediction type): one of SCHEDULERS,
    or MODEL_SCHEDULER for the model's own."""
    if name == MODEL_SCHEDULER:
        return model_scheduler(components)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose {MODEL_SCHEDULER} (the model's own) or one of "
                         f"{sorted(SCHEDULERS)}")
    return SCHEDULERS[name](components.scheduler.config)


def make_pipeline(components: SDComponents, scheduler: str = "ddim"):
    """A stock pipeline over `components` (no copy of the weights) with the named sampler, quiet."""
    pipe = build_pipeline(components, make_scheduler(scheduler, components))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


EMBED_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
               "negative_pooled_prompt_embeds")


@torch.no_grad()
def encode_text(pipe, prompt: str, guidance_scale: float) -> dict[str, torch.Tensor | None]:
    """One prompt's embeddings as the stock pipeline computes them (its default negative prompt: "" for
    SD 1.x / 2.x, for SDXL zeros unless the model's force_zeros_for_empty_prompt is off), keyed by the
    pipeline's argument names: prompt_embeds (1, T, C), negative_prompt_embeds (None without guidance) and,
    for SDXL, the pooled (1, P) pair."""
    out = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=guidance_scale > 1.0)
    return dict(zip(EMBED_NAMES, out))


def _vae_outside_autocast(pipe) -> bool:
    """fp16 autocast is on and the VAE kept fp32 weights (see the module docstring)."""
    device = pipe.vae.device.type
    return (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
            and pipe.vae.dtype == torch.float32)


def _decode_outside_autocast(pipe, latents: torch.Tensor, pipe_output: str):
    """The pipeline's decode step with the autocast of the caller switched off (fp32 VAE)."""
    vae = pipe.vae
    with torch.autocast(vae.device.type, enabled=False):
        images = vae.decode(latents.float() / vae.config.scaling_factor).sample  # (B, 3, H, W) in ~[-1, 1]
    return pipe.image_processor.postprocess(images, output_type=pipe_output)


@torch.no_grad()
def sample(pipe, prompts: Sequence[str] | None = None, *, seeds: Sequence[int] | None = None,
           generator: torch.Generator | None = None, num_inference_steps: int = 40,
           guidance_scale: float = 1.0,
           eta: float = 0.0, embeds: dict[str, torch.Tensor | None] | None = None, batch_size: int = 8,
           output: str = "uint8"):
    """Images for `prompts` (or for one prompt's `embeds` from `encode_text`, repeated len(seeds) times).

    Exactly one of `seeds` (one generator per image) and `generator` (one for the whole call) is given.
    `output`: "latent" (B, C, h, w), "pt" float (B, 3, H, W) in [0, 1], "uint8" (B, H, W, 3), "pil" list.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if (seeds is None) == (generator is None):
        raise ValueError("give exactly one of seeds (one generator per image) and generator (one for all)")
    if (prompts is None) == (embeds is None):
        raise ValueError("give either prompts or embeds")
    if embeds is not None and set(embeds) - set(EMBED_NAMES):
        raise ValueError(f"embeds takes {EMBED_NAMES}, got {sorted(embeds)}")
    n = len(prompts) if prompts is not None else len(seeds)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipe_output = {"latent": "latent", "pt": "pt", "uint8": "pt", "pil": "pil"}[output]
    decode_here = output != "latent" and _vae_outside_autocast(pipe)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        if prompts is not None:
            text = {"prompt": list(prompts[start : start + b])}
        else:  # (1, T, C) -> (b, T, C); pooled (1, P) -> (b, P)
            text = {k: v.expand(b, *v.shape[1:]) for k, v in embeds.items() if v is not None}
        gens = seed_generators(seeds[start : start + b]) if seeds is not None else generator
        images = pipe(**text, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                      generator=gens, output_type="latent" if decode_here else pipe_output).images
        if decode_here:
            images = _decode_outside_autocast(pipe, images, pipe_output)
        out.append(to_uint8(images) if output == "uint8" else images)
    if output == "pil":
        return [image for chunk in out for image in chunk]
    return np.concatenate(out) if output == "uint8" else torch.cat(out)
