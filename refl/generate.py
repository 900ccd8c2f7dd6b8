"""Generate images with a (LoRA-tuned) Stable Diffusion: PNGs + generations.jsonl.

Seeds: image k of every prompt uses seed + k, so arms (base, LoRA, best-of-N) share starting noise.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refl.components import DTYPES, ModelConfig, build_pipeline, load_components
from refl.lora import load_lora_into
from refl.sampling import MODEL_SCHEDULER, make_scheduler, sample
from runkit.config import check_mixed_precision, resolve_device
from runkit.files import atomic_write_bytes

logger = logging.getLogger(__name__)


def load_pipeline(model: str, lora: str | None = None, lora_scale: float = 1.0, device: str | None = None,
                  attention: str = "sdpa", mixed_precision: str = "no", vae: str | None = None,
                  scheduler: str = MODEL_SCHEDULER):
    """The model family's stock pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline,
    StableDiffusion3Pipeline, FluxPipeline) from a diffusers dir / hub id / preset, with an optional LoRA
    and VAE (`vae`: e.g. an fp16-safe SDXL VAE), its weights in the dtype `mixed_precision` names (no =
    fp32; fp16 needs a GPU; bf16 runs anywhere). Under fp16 the SDXL pipeline decodes in fp32 itself unless
    the VAE's config says it is fp16-safe."""
    check_mixed_precision(mixed_precision, "mixed_precision")
    components = load_components(ModelConfig(name=model, attention=attention, vae=vae))
    pipe = build_pipeline(components, make_scheduler(scheduler, components))
    logger.info("sampling with %s (scheduler=%s)", type(pipe.scheduler).__name__, scheduler)
    if lora is not None:
        load_lora_into(pipe, lora, adapter_name="refl")
        pipe.set_adapters(["refl"], adapter_weights=[lora_scale])
    device = resolve_device(device, mixed_precision)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, DTYPES[mixed_precision])


MANIFEST = "generations.jsonl"
_IMAGE_NAME = re.compile(r"\d{4}_\d{2}\.png")  # what `generate` names its images


def prepare_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output folder, made sure to hold no images of an earlier run: with `overwrite` they are removed
    (and the log says how many); without it a folder holding them is refused, so a folder never mixes two
    runs' images. Files `generate` did not write are left alone."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; name a folder")
    earlier = sorted(p for p in out.iterdir() if _IMAGE_NAME.fullmatch(p.name) or p.name == MANIFEST) \
        if out.is_dir() else []
    if earlier and not overwrite:
        raise FileExistsError(f"--out {out} holds {len(earlier)} files of an earlier generation "
                              f"({earlier[0].name}, ...); pass --overwrite to replace them, or name a new "
                              "folder")
    for path in earlier:
        path.unlink()
    if earlier:
        logger.info("removed %d files of an earlier generation from %s", len(earlier), out)
    out.mkdir(parents=True, exist_ok=True)
    return out


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], out: str | os.PathLike, n: int = 4, seed: int = 0,
             num_inference_steps: int = 40, guidance_scale: float = 7.5, critic=None,
             batch_size: int = 8, overwrite: bool = False) -> list[dict]:
    """n images per prompt -> out/{prompt:04d}_{k:02d}.png and out/generations.jsonl (one record each).

    Images are drawn `batch_size` per pipeline call (a GPU idles on one); each image keeps its own
    CPU generator seeded seed + k, so the pictures do not depend on the batch size. A folder holding an
    earlier generation is refused unless `overwrite` (see `prepare_output`)."""
    if batch_size < 1 or n < 1:
        raise ValueError(f"images per prompt and batch size must be >= 1, got n={n}, batch_size={batch_size}")
    if not prompts:
        raise ValueError("no prompts to generate from")
    out = prepare_output(out, overwrite)
    jobs = [(i, prompt, k) for i, prompt in enumerate(prompts) for k in range(n)]
    records = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generate", unit="batch"):
        chunk = jobs[start : start + batch_size]
        images = sample(pipe, [p for _, p, _ in chunk], seeds=[seed + k for _, _, k in chunk], output="pil",
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        batch_size=batch_size)
        for (i, prompt, k), image in zip(chunk, images):
            name = f"{i:04d}_{k:02d}.png"
            atomic_write_bytes(out / name, lambda f, image=image: image.save(f, format="PNG"))
            record = {"prompt": prompt, "seed": seed + k, "file": name}
            if critic is not None:
                record["critic_score"] = float(critic.score(prompt, image))
            records.append(record)
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write_bytes(out / MANIFEST, lambda f: f.write(text.encode()))
    logger.info("wrote %d images to %s", len(records), out)
    return records
