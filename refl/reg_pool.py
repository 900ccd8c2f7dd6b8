"""Data of the denoising regulariser (`step.reg_weight`): clean latents and their captions, built once.

Either an image-caption table (`data.reg_images`, the paper's pre-training data) encoded by the VAE,
or base-model samples (LoRA off) of the training prompts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from refl.components import SDComponents
from refl.prompts import prompts_for, seed_for
from refl.sampling import make_pipeline, sample
from refl.step import base_weights, encode_images

logger = logging.getLogger(__name__)


def load_caption_images(path: str | os.PathLike, image_column: str, caption_column: str, size: int,
                        limit: int, seed: int,
                        shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` rows of an image-caption table (random rows, fixed by `seed`) -> images (N, 3, S, S)
    in [0, 1] (shortest side resized to `size`, centre crop) and their captions.

    `shard` = (index, count): this process reads only every count-th of those rows, from `index`."""
    import pandas as pd

    from reward.model import load_image_tensor

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.reg_images {path} does not exist (a .parquet, .csv or .jsonl table "
                                f"with columns {image_column!r} and {caption_column!r})")
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv,
               ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix not in readers:
        raise ValueError(f"data.reg_images {path}: unsupported suffix {path.suffix!r}; use one of "
                         f"{sorted(readers)}")
    frame = readers[path.suffix](path)
    missing = [c for c in (image_column, caption_column) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing} (columns: {list(frame.columns)}); set "
                         "data.reg_image_column / data.reg_caption_column")
    if len(frame) == 0:
        raise ValueError(f"{path} has no rows")
    rows = np.random.default_rng(seed).permutation(len(frame))[:limit]
    index, count = shard
    if len(rows) < count:
        raise ValueError(f"data.reg_images {path} has {len(rows)} row(s) for {count} processes; every "
                         "process needs at least one")
    images, captions = [], []
    for i in sorted(rows[index::count].tolist()):
        caption = frame[caption_column].iloc[i]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path} row {i}: empty caption in column {caption_column!r}; fill it or drop "
                             "the row")
        image = Path(str(frame[image_column].iloc[i]))
        image = image if image.is_absolute() else path.parent / image
        try:
            images.append(load_image_tensor(image, size))  # (3, S, S)
        except (OSError, ValueError) as err:  # missing, corrupt, or refused by reward.images.decode_image
            raise type(err)(f"{path} row {i}: {err}") from err
        captions.append(caption.strip())
    return torch.stack(images), captions  # (N, 3, S, S), N captions


def build_reg_pool(components: SDComponents, cfg, prompts: list[str], accelerator):
    """Clean latents and captions for the denoising regulariser: the configured image-caption set
    (VAE-encoded) or base-model (LoRA off) samples of the training prompts."""
    n = max(1, cfg.data.reg_pool_size // accelerator.num_processes)
    gen = torch.Generator().manual_seed(seed_for(cfg.train.seed, 8, accelerator.process_index))
    if cfg.data.reg_images:
        d = cfg.data
        size = components.image_size
        images, captions = load_caption_images(d.reg_images, d.reg_image_column, d.reg_caption_column, size,
                                               n * accelerator.num_processes, cfg.train.seed,
                                               shard=(accelerator.process_index, accelerator.num_processes))
        latents = torch.cat([encode_images(components, images[i : i + 16], gen)
                             for i in range(0, len(images), 16)])
        logger.info("denoising regulariser: %d images from %s", len(captions), d.reg_images)
        return latents, captions  # (n, C, h, w), n captions
    captions = prompts_for(prompts, seed_for(cfg.train.seed, 7), accelerator.process_index * n, n)
    with base_weights(components), components.autocast():
        latents = sample(make_pipeline(components, cfg.step.scheduler), captions, generator=gen,
                         batch_size=16,
                         num_inference_steps=cfg.step.num_inference_steps, output="latent")  # (n, C, h, w)
    return latents, captions
