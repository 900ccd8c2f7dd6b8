"""The one way this project draws images without gradient: a stock `StableDiffusionPipeline` call.

Training validation, the regulariser's base samples, the comparison harness, `generate.py` and the toy
world's pre-training report and community all call `sample`. The ReFL step keeps its own loop: it
needs the gradient through part of the trajectory, which a pipeline call cannot give.

Seeds: `seeds` gives every image its own CPU generator, so an image does not depend on the batch it
was drawn in; `generator` shares one generator across the call (drawn from in batch order), which is
what a training loop that reproduces a whole batch from one seed wants.
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


def make_scheduler(name: str, components: SDComponents):
    """A sampling scheduler sharing the model's noise schedule (betas, prediction type)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
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


@torch.no_grad()
def sample(pipe, prompts: Sequence[str] | None = None, *, seeds: Sequence[int] | None = None,
           generator: torch.Generator | None = None, num_inference_steps: int = 40, guidance_scale: float = 1.0,
           eta: float = 0.0, prompt_embeds: torch.Tensor | None = None,
           negative_prompt_embeds: torch.Tensor | None = None, batch_size: int = 8, output: str = "uint8"):
    """Images for `prompts` (or for one prompt's embeddings, (1, T, C), repeated len(seeds) times).

    Exactly one of `seeds` (one generator per image) and `generator` (one for the whole call) is given.
    `output`: "latent" (B, C, h, w), "pt" float (B, 3, H, W) in [0, 1], "uint8" (B, H, W, 3), "pil" list.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if (seeds is None) == (generator is None):
        raise ValueError("give exactly one of seeds (one generator per image) and generator (one for all)")
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("give either prompts or prompt_embeds")
    n = len(prompts) if prompts is not None else len(seeds)
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pipe_output = {"latent": "latent", "pt": "pt", "uint8": "pt", "pil": "pil"}[output]
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        text = ({"prompt": list(prompts[start : start + b])} if prompts is not None else
                {"prompt_embeds": prompt_embeds.expand(b, -1, -1),  # (b, T, C)
                 "negative_prompt_embeds": None if negative_prompt_embeds is None
                 else negative_prompt_embeds.expand(b, -1, -1)})  # (b, T, C)
        gens = seed_generators(seeds[start : start + b]) if seeds is not None else generator
        images = pipe(**text, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                      generator=gens, output_type=pipe_output).images
        out.append(to_uint8(images) if output == "uint8" else images)
    if output == "pil":
        return [image for chunk in out for image in chunk]
    return np.concatenate(out) if output == "uint8" else torch.cat(out)
