"""A feed: the images a platform shows its users, drawn from one model (the base, or base + a LoRA) for
prompts x seeds x guidance scales, written with a manifest that the feedback readers take once feedback is
attached.

A feed folder holds

    feed.parquet   one row per image: prompt, image (its path relative to this folder), seed,
                   guidance_scale, and what drew it: model, lora, lora_scale, num_inference_steps, scheduler
    images/PPPP_QQQ.png   image QQQ of prompt PPPP
    config.yaml    the resolved FeedConfig (written by the command)

Feedback attaches without moving an image: a `label` column (1 liked, 0 not) makes feed.parquet a table of the
labelled format (reward.data.LABEL_FORMATS: prompt, image, label; Diffusion-KTO reads it), and a pairs file
(prompt, pos_path, neg_path) written into this folder names the same paths (the social format the critic
trainer and Diffusion-DPO read). The toy world's community writes its pairs over a feed that way.

Seeds: per prompt, image q is entry q % G of `guidance_scales` (G entries) in its round q // G of `n_seeds`,
drawn from seed + SEED_STRIDE * p + q (p the prompt's index) with its own CPU generator, so no two images of a
feed share their noise and an image does not depend on the batch it was drawn in. Drawing goes through
refl.sampling.sample, the project's one way to draw without gradient.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from refl.components import ModelConfig
from runkit.config import check_mixed_precision

logger = logging.getLogger(__name__)

MANIFEST = "feed.parquet"
IMAGES = "images"
# Per-prompt seed offset, larger than any sensible number of images per prompt (the comparison harness's).
SEED_STRIDE = 100_003
COLUMNS = ["prompt", "image", "seed", "guidance_scale", "model", "lora", "lora_scale", "num_inference_steps",
           "scheduler"]


@dataclass
class FeedConfig:
    """What `social-refl-feed` draws: a model's images for prompts x seeds x guidance scales, in a folder a
    platform can show and collect feedback on (feed.parquet and images/)."""

    # The model drawing the feed (model.name: a diffusers directory, hub id or preset; model.vae: another
    # VAE).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    # LoRA folder in diffusers format (a run's lora/ or lora_best/); "" = the base model alone.
    lora: str = ""
    # Multiplier of the LoRA update (1 = as trained).
    lora_scale: float = 1.0
    # Prompts file: .txt (one per line), or .parquet/.csv with a `prompt_column`.
    prompts_file: str = ""
    # Column holding the prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # The guidance scale of each image drawn per prompt and seed round (its length is the images per round; a
    # scale listed twice is drawn twice). Users set their own (DiffusionDB's spread over ~1-20).
    guidance_scales: list[float] = field(default_factory=lambda: [7.5])
    # Rounds of guidance_scales per prompt: n_seeds x len(guidance_scales) images per prompt.
    n_seeds: int = 1
    # Image q of prompt p uses seed + 100003 * p + q.
    seed: int = 0
    # Sampler steps per image.
    num_inference_steps: int = 40
    # Sampler: "model" (the one the model ships) or one of refl.sampling.SCHEDULERS.
    scheduler: str = "model"
    # Images per pipeline call, per process; the images do not depend on it.
    batch_size: int = 8
    # "no" (fp32), "fp16" (GPU only) or "bf16": the weights' and activations' dtype while sampling.
    mixed_precision: str = "no"
    # "cuda", "cpu", ...; "" = CUDA when there is one.
    device: str = ""
    # The feed folder: feed.parquet, images/, config.yaml.
    output_dir: str = ""
    # Replace an earlier feed in output_dir (refused without it).
    overwrite: bool = False
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        if not self.guidance_scales:
            raise ValueError("guidance_scales is empty: list the guidance scale of each image per seed round")
        if self.n_seeds < 1 or self.batch_size < 1 or self.num_inference_steps < 1:
            raise ValueError(f"n_seeds, batch_size and num_inference_steps must be at least 1, got "
                             f"{self.n_seeds}, {self.batch_size} and {self.num_inference_steps}")
        check_mixed_precision(self.mixed_precision, "mixed_precision")


def image_seed(seed: int, prompt_index: int, slot: int) -> int:
    """The seed of image `slot` of prompt `prompt_index` in a feed drawn from `seed`."""
    return seed + SEED_STRIDE * prompt_index + slot


def _slots(guidance_scales: Sequence[float], n_seeds: int) -> list[float]:
    """The guidance scale of each image of one prompt, in slot order."""
    return [float(g) for _ in range(n_seeds) for g in guidance_scales]


def _draw(pipe, prompts: Sequence[str], guidance_scales: Sequence[float], n_seeds: int, seed: int,
          num_inference_steps: int, batch_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(prompt index, slot, (H, W, 3) uint8) for every image, drawn a guidance scale at a time (one scale per
    pipeline call)."""
    from refl.sampling import sample

    slots = _slots(guidance_scales, n_seeds)
    for g in dict.fromkeys(slots):
        jobs = [(p, q) for p in range(len(prompts)) for q, s in enumerate(slots) if s == g]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            images = sample(pipe, [prompts[p] for p, _ in chunk],
                            seeds=[image_seed(seed, p, q) for p, q in chunk],
                            num_inference_steps=num_inference_steps, guidance_scale=g,
                            batch_size=batch_size)  # (b, H, W, 3) uint8
            for (p, q), image in zip(chunk, images):
                yield p, q, image


def draw_feed(pipe, prompts: Sequence[str], guidance_scales: Sequence[float], n_seeds: int = 1, seed: int = 0,
              num_inference_steps: int = 40, batch_size: int = 8) -> np.ndarray:
    """A feed's images in memory, (P, n_seeds x G, H, W, 3) uint8: image [p, q] is what `write_feed` writes as
    images/PPPP_QQQ.png."""
    found = {(p, q): image for p, q, image in _draw(pipe, prompts, guidance_scales, n_seeds, seed,
                                                     num_inference_steps, batch_size)}
    n = len(_slots(guidance_scales, n_seeds))
    return np.stack([np.stack([found[p, q] for q in range(n)]) for p in range(len(prompts))])


def image_name(prompt_index: int, slot: int) -> str:
    return f"{IMAGES}/{prompt_index:04d}_{slot:03d}.png"


def image_slot(path: str | os.PathLike) -> int:
    """The slot of a feed image (its index among its prompt's images) from its file name."""
    return int(Path(path).stem.rsplit("_", 1)[1])


def prepare_feed_folder(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The feed folder, made sure to hold no earlier feed (removed with `overwrite`, refused without it), so a
    manifest never mixes two feeds' images."""
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; name a folder for the feed")
    earlier = [p for p in (out / MANIFEST, out / IMAGES) if p.exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"--out {out} holds an earlier feed ({earlier[0].name}); pass --overwrite to "
                              "replace it, or name a new folder")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    return out


def write_feed(pipe, prompts: Sequence[str], out: str | os.PathLike, guidance_scales: Sequence[float],
               n_seeds: int = 1, seed: int = 0, num_inference_steps: int = 40, batch_size: int = 8,
               drawn_by: dict | None = None, overwrite: bool = False) -> pd.DataFrame:
    """Draw the feed with `pipe` (a stock pipeline, its LoRA loaded) into `out`: the PNGs as they come, then
    feed.parquet (last, so a folder with a manifest is complete). `drawn_by` fills the manifest's model, lora,
    lora_scale and scheduler columns. Returns the manifest."""
    from PIL import Image

    from runkit.files import atomic_write_bytes

    if not prompts:
        raise ValueError("no prompts to draw a feed for")
    out = prepare_feed_folder(out, overwrite)
    slots = _slots(guidance_scales, n_seeds)
    who = {"model": "", "lora": "", "lora_scale": 1.0, "scheduler": "", **(drawn_by or {})}
    rows = {}
    for p, q, image in _draw(pipe, prompts, guidance_scales, n_seeds, seed, num_inference_steps, batch_size):
        name = image_name(p, q)
        atomic_write_bytes(out / name, lambda f, image=image: Image.fromarray(image).save(f, format="PNG"))
        rows[p, q] = {"prompt": prompts[p], "image": name, "seed": image_seed(seed, p, q),
                      "guidance_scale": slots[q], **{k: who[k] for k in ("model", "lora", "lora_scale")},
                      "num_inference_steps": num_inference_steps, "scheduler": who["scheduler"]}
    manifest = pd.DataFrame([rows[key] for key in sorted(rows)], columns=COLUMNS)
    atomic_write_bytes(out / MANIFEST, lambda f: manifest.to_parquet(f, index=False))
    logger.info("wrote a feed of %d images (%d prompts x %d) to %s", len(manifest), len(prompts), len(slots),
                out)
    return manifest


def read_feed(folder: str | os.PathLike) -> pd.DataFrame:
    """A feed's manifest with each image's path made absolute; FileNotFoundError naming the folder when it
    holds no complete feed."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST}: not a feed folder (social-refl-feed writes "
                                "one), or its drawing did not finish")
    manifest = pd.read_parquet(folder / MANIFEST)
    manifest["image"] = [str((folder / name).resolve()) for name in manifest["image"]]
    return manifest
