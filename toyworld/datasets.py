"""Data sets of plain renders: the toy world's pre-training data (for the toy SD and the toy CLIP's
held-out probe) and the same as an image-caption table (ReFL's denoising regulariser).

They sit above both the grammar (world.py) and the renderer (render.py), which imports the grammar.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from runkit.files import atomic_write_bytes
from toyworld.render import render_array
from toyworld.world import parse_prompt, split_prompts


def render_dataset(n: int, seed: int = 0, split: str = "train", size: int = 32,
                   split_seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """`n` renders of prompts drawn uniformly from one split: (images (n, size, size, 3) uint8, prompts)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    train, held = split_prompts(split_seed)
    pool = {"train": train, "heldout": held, "all": train + held}[split]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=n)
    prompts = [pool[i] for i in picks]
    images = np.empty((n, size, size, 3), dtype=np.uint8)  # (n, H, W, 3)
    for i, prompt in enumerate(prompts):
        images[i] = render_array(parse_prompt(prompt), rng, size)
    return images, prompts


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
