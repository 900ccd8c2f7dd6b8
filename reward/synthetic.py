"""A small learnable preference set, for tests and smoke runs before real data exists.

Each prompt names a colour; the preferred image is a noisy field tinted towards that colour,
the rejected one towards another colour. A critic has to read both the text and the image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (235, 235, 235), "black": (25, 25, 25),
}


def _tinted(rng: np.random.Generator, rgb, size: int) -> Image.Image:
    noise = rng.normal(0, 40, size=(size, size, 3))  # (S, S, 3)
    arr = np.clip(np.asarray(rgb, dtype=np.float64)[None, None] * rng.uniform(0.7, 1.0) + noise, 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def make_colour_pairs(out_dir: str | Path, n_pairs: int = 256, size: int = 32, seed: int = 0) -> Path:
    """Write PNGs and `pairs.parquet` (prompt, pos_path, neg_path) under `out_dir`; returns the parquet."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n_pairs):
        want, other = rng.choice(len(names), size=2, replace=False)
        prompt = f"a {names[want]} picture" if i % 2 else f"something {names[want]}"
        pos, neg = f"images/{i:05d}_pos.png", f"images/{i:05d}_neg.png"
        _tinted(rng, COLOURS[names[want]], size).save(out / pos)
        _tinted(rng, COLOURS[names[other]], size).save(out / neg)
        rows.append({"prompt": prompt, "pos_path": pos, "neg_path": neg})
    path = out / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path
