"""Data sets of renders: the toy world's pre-training data (for the toy SD, of mixed quality, and the toy
CLIP's held-out probe) and plain renders as an image-caption table (ReFL's denoising regulariser).

They sit above both the grammar (world.py) and the renderer (render.py), which imports the grammar.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runkit.files import atomic_write_bytes
from toyworld.render import draw_look, sample_look
from toyworld.world import parse_prompt, split_prompts


def render_dataset(n: int, seed: int = 0, split: str = "train", size: int = 32, split_seed: int = 0,
                   quality_fraction: float = 0.0, return_quality: bool = False):
    """`n` renders of prompts drawn uniformly from one split: (images (n, size, size, 3) uint8, prompts).

    `quality_fraction` of them (chosen at random) get a look drawn at a quality ~ U[0, 1]
    (`render.sample_look`: faded to vivid, low to high contrast, off to on its anchor, small to large,
    blurred to sharp, noisy to clean), the rest are plain renders: pre-training data of every quality,
    as web data is. With `return_quality` a third array gives each render's quality (NaN = plain).
    With quality_fraction 0 the renders are those of earlier versions, draw for draw."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    if not 0.0 <= quality_fraction <= 1.0:
        raise ValueError(f"quality_fraction must be in [0, 1], got {quality_fraction}")
    train, held = split_prompts(split_seed)
    pool = {"train": train, "heldout": held, "all": train + held}[split]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=n)
    prompts = [pool[i] for i in picks]
    quality = np.full(n, np.nan)
    if quality_fraction > 0:
        # Its own generator, so the choice of which renders vary does not shift the renders' own draws.
        qrng = np.random.default_rng([seed, 1])
        varied = qrng.uniform(size=n) < quality_fraction
        quality[varied] = qrng.uniform(0, 1, size=int(varied.sum()))
    images = np.empty((n, size, size, 3), dtype=np.uint8)  # (n, H, W, 3)
    for i, prompt in enumerate(prompts):
        scene = parse_prompt(prompt)
        q = None if np.isnan(quality[i]) else float(quality[i])
        images[i] = draw_look(scene.shape, sample_look(scene, rng, quality=q), rng, size)
    return (images, prompts, quality) if return_quality else (images, prompts)


def write_caption_set(out_dir: str | os.PathLike, n: int, seed: int = 0, split: str = "train",
                      size: int = 32) -> Path:
    """The world's pre-training data as an image-caption table: `n` renders as PNGs plus
    `out_dir/captions.parquet` (`image` paths relative to it, `caption`). ReFL's denoising
    regulariser reads it through `data.reg_images`. Returns the parquet's path."""
    import pandas as pd
    from PIL import Image

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, prompts = render_dataset(n, seed=seed, split=split, size=size)
    rows = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        name = f"images/{i:05d}.png"
        Image.fromarray(image).save(out / name)
        rows.append({"image": name, "caption": prompt})
    table = out / "captions.parquet"
    atomic_write_bytes(table, lambda f: pd.DataFrame(rows).to_parquet(f, index=False))
    return table
