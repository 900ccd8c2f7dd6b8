"""Generate images with a (LoRA-tuned) Stable Diffusion: PNGs + generations.jsonl.

Seeds: image k of every prompt uses seed + k, so arms (base, LoRA, best-of-N) share starting noise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from refl.components import ModelConfig, build_pipeline, load_components

logger = logging.getLogger(__name__)


def load_pipeline(model: str, lora: str | None = None, lora_scale: float = 1.0, device: str | None = None,
                  attention: str = "sdpa"):
    """A stock StableDiffusionPipeline from a diffusers dir / cached id / preset, with an optional LoRA."""
    pipe = build_pipeline(load_components(ModelConfig(name=model, attention=attention)))
    if lora is not None:
        if not Path(lora).exists():
            raise FileNotFoundError(f"LoRA {lora} does not exist (expected a directory written by refl training)")
        pipe.load_lora_weights(lora, adapter_name="refl")
        pipe.set_adapters(["refl"], adapter_weights=[lora_scale])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], out: str | os.PathLike, n: int = 4, seed: int = 0,
             num_inference_steps: int = 40, guidance_scale: float = 7.5, critic=None) -> list[dict]:
    """n images per prompt -> out/{prompt:04d}_{k:02d}.png and out/generations.jsonl (one record each)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, prompt in enumerate(prompts):
        for k in range(n):
            gen = torch.Generator().manual_seed(seed + k)
            image = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                         generator=gen).images[0]
            name = f"{i:04d}_{k:02d}.png"
            image.save(out / name)
            record = {"prompt": prompt, "seed": seed + k, "file": name}
            if critic is not None:
                record["critic_score"] = float(critic.score(prompt, image))
            records.append(record)
    tmp = out / "generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out / "generations.jsonl")
    logger.info("wrote %d images to %s", len(records), out)
    return records
