"""Synthetic Pick-a-Pic-style shard sets for the streaming tests."""

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encoded_image(rng, size=8, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def pickapic_rows(n, seed=0, size=8):
    """Rows cycling through jpg_0 preferred, jpg_1 preferred and a tie."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label_0 = [1.0, 0.0, 0.5][i % 3]
        rows.append({"caption": f"prompt {i}", "jpg_0": encoded_image(rng, size),
                     "jpg_1": encoded_image(rng, size), "label_0": label_0, "label_1": 1.0 - label_0})
    return rows


def write_shards(root: Path, rows, n_shards=3, row_group=8, split="train") -> list[Path]:
    """Pick-a-Pic v2 as the hub serves it: data/<split>-0000k-of-0000n-<hash>.parquet (row i in shard i %
    n)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_shards):
        path = root / f"{split}-{k:05d}-of-{n_shards:05d}-abc123.parquet"
        pq.write_table(pa.Table.from_pylist(rows[k::n_shards]), path, row_group_size=row_group)
        paths.append(path)
    return paths
