"""The one way this project draws images without gradient: a call of the model family's stock pipeline
(`StableDiffusionPipeline`, `StableDiffusionXLPipeline`, `StableDiffusion3Pipeline`, `FluxPipeline`;
`refl.components.build_pipeline` picks the class).

Training validation, the regulariser's base samples, the comparison harness, `generate.py` and the toy
world's pre-training report and community all call `sample`. The ReFL step keeps its own loop: it
needs the gradient through part of the trajectory, which a pipeline call cannot give.

Seeds: `seeds` gives every image its own CPU generator, so an image does not depend on the batch it
was drawn in; `generator` shares one generator across the call (drawn from in batch order), which is
what a training loop that reproduces a whole batch from one seed wants.

Text: `prompts`, or embeddings keyed by the pipeline's argument names (so SDXL's, SD 3's and FLUX's pooled
embeddings travel with them): one prompt's from `encode_text` (the pipeline's own `encode_prompt`), repeated
for every image, or one row per image (a run's precomputed embeddings, refl.text_embeddings).

Samplers (`SCHEDULERS`): the UNet families sample with `ddim` or `ddpm` on their DDPM schedule; the
flow-matching families with `flow_euler`, the model's own FlowMatchEulerDiscreteScheduler (its shift).
`guidance_scale` is classifier-free guidance (a negative pass) for SD 1.x / 2.x, SDXL and SD 3, and FLUX's
guidance embedding (guidance-distilled: one pass, no negative). Latents (`output="latent"`) are always
(B, C, h, w) in the VAE's scaled space: FLUX's packed tokens are unpacked.

Half precision: under fp16 autocast with a VAE kept in fp32 (refl.components: SDXL's VAE overflows in
fp16), the pipeline returns latents and the VAE decodes them outside autocast; the pipeline's own
decode would run the VAE's convolutions in fp16 under the caller's autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from refl.components import FAMILY_PIPELINES, FLOW_FAMILIES, SDComponents, build_pipeline, t5_options

OUTPUTS = ("latent", "pt", "uint8", "pil")


def _ddim(config):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def _ddpm(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def _flow_euler(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config)


SCHEDULERS: dict[str, Callable] = {"ddim": _ddim, "ddpm": _ddpm, "flow_euler": _flow_euler}
# The samplers that fit a flow-matching model; the others fit the UNet (DDPM-trained) families.
FLOW_SCHEDULERS = ("flow_euler",)
# `scheduler: model`: the sampler the model's own model_index.json names (SDXL base ships Euler), built from
# its scheduler/scheduler_config.json: what `DiffusionPipeline.from_pretrained` of that model samples with.
# For presets: DDPM (UNet families) or the flow Euler sampler.
MODEL_SCHEDULER = "model"


def schedulers_for(components: SDComponents) -> list[str]:
    """The SCHEDULERS names that fit this model's family."""
    return family_schedulers(components.family)


def family_schedulers(family: str) -> list[str]:
    """The SCHEDULERS names that fit a model of `family`."""
    return [n for n in SCHEDULERS if (n in FLOW_SCHEDULERS) == (family in FLOW_FAMILIES)]


def check_scheduler(name: str, family: str, model: str) -> None:
    """Refuse a sampler that is unknown or does not fit a `family` model (named `model` in the message),
    from the family alone: a trainer can say it before the model loads."""
    if name == MODEL_SCHEDULER:
        return
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose {MODEL_SCHEDULER} (the model's own) or one of "
                         f"{sorted(SCHEDULERS)}")
    fitting = family_schedulers(family)
    if name not in fitting:
        kind = "flow matching" if family in FLOW_FAMILIES else "a DDPM schedule"
        raise ValueError(f"scheduler {name!r} does not fit {model} (a {family} model: {kind}); choose one of "
                         f"{fitting}")


def model_scheduler(components: SDComponents):
    """The scheduler the model's directory (or cached hub id) ships, as its stock pipeline loads it."""
    import diffusers

    source = components.source
    if source.startswith(("preset:", "random:")):
        return SCHEDULERS[schedulers_for(components)[-1]](components.scheduler.config)
    # Both honour HF_HUB_OFFLINE (a hub id is read from the cache the model was loaded from).
    name = diffusers.DiffusionPipeline.load_config(source).get("scheduler", [None, None])[1]
    cls = getattr(diffusers, name or "", None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"{source}: model_index.json names the scheduler {name!r}, which this diffusers "
                         f"does not have; set scheduler to one of {schedulers_for(components)}")
    return cls.from_config(cls.load_config(source, subfolder="scheduler"))


def family_scheduler(family: str, preferred: str = "ddim") -> str:
    """`preferred` if that sampler fits a model of `family`, else the family's own kind of sampler: one
    setting that reads the same on a UNet and on a flow model (the toy world's demo and pre-training
    sample the UNet with DDIM, a flow model with its flow Euler sampler)."""
    if preferred == MODEL_SCHEDULER or (preferred in FLOW_SCHEDULERS) == (family in FLOW_FAMILIES):
        return preferred
    return FLOW_SCHEDULERS[0] if family in FLOW_FAMILIES else "ddim"


def make_scheduler(name: str, components: SDComponents):
    """A sampling scheduler sharing the model's noise schedule (betas and prediction type; a flow model's
    shift): one of SCHEDULERS, or MODEL_SCHEDULER for the model's own; a ValueError names the samplers that
    fit the model's family."""
    if name == MODEL_SCHEDULER:
        return model_scheduler(components)
    check_scheduler(name, components.family, components.source)
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


def pipeline_family(pipe) -> str:
    """The family of a stock pipeline (refl.components.FAMILY_PIPELINES)."""
    by_class = {cls: family for family, cls in FAMILY_PIPELINES.items()}
    if type(pipe).__name__ not in by_class:
        raise TypeError(f"{type(pipe).__name__} is none of the stock pipelines {sorted(by_class)}")
    return by_class[type(pipe).__name__]


@torch.no_grad()
def encode_text(pipe, prompt: str, guidance_scale: float) -> dict[str, torch.Tensor | None]:
    """One prompt's embeddings as the stock pipeline computes them (its default negative prompt: "" for
    SD 1.x / 2.x and SD 3, for SDXL zeros unless the model's force_zeros_for_empty_prompt is off; FLUX has
    none), keyed by the pipeline's argument names: prompt_embeds (1, T, C), negative_prompt_embeds (None
    without guidance) and, for SDXL, SD 3 and FLUX, the pooled (1, P) pair."""
    if pipeline_family(pipe) == "flux":  # guidance-distilled: no negative; text_ids the pipeline remakes
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe.device,
                                               num_images_per_prompt=1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    # SD 3's takes a prompt per text encoder; None = the same prompt for each
    others = ({"prompt_2": None, "prompt_3": None, **t5_options(pipe.transformer)}
              if pipeline_family(pipe) == "sd3" else {})
    out = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=guidance_scale > 1.0, **others)
    return dict(zip(EMBED_NAMES, out))


def image_size(pipe) -> int:
    """The pixels per side a flow pipeline draws for its model: SD 3's transformer's sample size in pixels,
    FLUX's VAE's sample size (its pipeline's own default is 1024 whatever the model)."""
    if pipeline_family(pipe) == "flux":
        return int(pipe.vae.config.sample_size)
    return int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor


def unpack_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """A pipeline's latent output as (B, C, h, w): FLUX's packed (B, h/2 * w/2, 4C) tokens unpacked with its
    own `_unpack_latents`; other families' as they are."""
    if pipeline_family(pipe) != "flux":
        return latents
    size = image_size(pipe)
    return type(pipe)._unpack_latents(latents, size, size, pipe.vae_scale_factor)  # (B, C, h, w)


def call_options(pipe, eta: float = 0.0) -> dict:
    """The keyword arguments a call of this stock pipeline takes beyond the prompt, steps and guidance: DDIM's
    eta for the UNet families (flow pipelines have none); a flow pipeline's height and width, its model's
    size (FLUX's pipeline would otherwise draw 1024 px whatever the model), and for a T5-less SD 3 its one
    zero T5 token (`refl.components.t5_options`)."""
    if pipeline_family(pipe) in FLOW_FAMILIES:  # a T5-less SD 3's short context (refl.components.zero_t5)
        return {"height": image_size(pipe), "width": image_size(pipe), **t5_options(pipe.transformer)}
    return {"eta": eta}


def _vae_outside_autocast(pipe) -> bool:
    """fp16 autocast is on and the VAE kept fp32 weights (see the module docstring)."""
    device = pipe.vae.device.type
    return (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
            and pipe.vae.dtype == torch.float32)


def _decode_outside_autocast(pipe, latents: torch.Tensor, pipe_output: str):
    """The pipeline's decode step with the autocast of the caller switched off (fp32 VAE)."""
    vae = pipe.vae
    latents = latents.float() / vae.config.scaling_factor  # (B, C, h, w)
    if getattr(vae.config, "shift_factor", None) is not None:  # SD 3's and FLUX's VAEs
        latents = latents + vae.config.shift_factor
    with torch.autocast(vae.device.type, enabled=False):
        images = vae.decode(latents).sample  # (B, 3, H, W) in ~[-1, 1]
    return pipe.image_processor.postprocess(images, output_type=pipe_output)


@torch.no_grad()
def sample(pipe, prompts: Sequence[str] | None = None, *, seeds: Sequence[int] | None = None,
           generator: torch.Generator | None = None, num_inference_steps: int = 40,
           guidance_scale: float = 1.0,
           eta: float = 0.0, embeds: dict[str, torch.Tensor | None] | None = None, batch_size: int = 8,
           output: str = "uint8"):
    """Images for `prompts`, or for `embeds`: one prompt's from `encode_text` (1, ...) repeated len(seeds)
    times, or one row per image (N, ...).

    Exactly one of `seeds` (one generator per image) and `generator` (one for the whole call) is given.
    `eta` is DDIM's; the flow families' sampler has none.
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
    rows = None if embeds is None else embeds["prompt_embeds"].shape[0]
    n = len(prompts) if prompts is not None else len(seeds) if seeds is not None and rows == 1 else rows
    if embeds is not None and rows not in (1, n):
        raise ValueError(f"embeds hold {rows} rows for {n} images: give one row, or one per image")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipe_output = {"latent": "latent", "pt": "pt", "uint8": "pt", "pil": "pil"}[output]
    decode_here = output != "latent" and _vae_outside_autocast(pipe)
    options = call_options(pipe, eta)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        if prompts is not None:
            text = {"prompt": list(prompts[start : start + b])}
        elif rows == 1:  # (1, T, C) -> (b, T, C); pooled (1, P) -> (b, P)
            text = {k: v.expand(b, *v.shape[1:]) for k, v in embeds.items() if v is not None}
        else:  # this batch's rows
            text = {k: v[start : start + b] for k, v in embeds.items() if v is not None}
        gens = seed_generators(seeds[start : start + b]) if seeds is not None else generator
        images = pipe(**text, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=gens, output_type="latent" if decode_here else pipe_output, **options).images
        if pipe_output == "latent" or decode_here:
            images = unpack_latents(pipe, images)  # (B, C, h, w)
        if decode_here:
            images = _decode_outside_autocast(pipe, images, pipe_output)
        out.append(to_uint8(images) if output == "uint8" else images)
    if output == "pil":
        return [image for chunk in out for image in chunk]
    return np.concatenate(out) if output == "uint8" else torch.cat(out)
