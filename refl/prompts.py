"""Prompts: reading prompt lists from files (shared by training, generation and the comparison harness)
and the order in which ReFL training sees them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def read_prompt_file(path: str | os.PathLike, column: str = "prompt", key: str = "prompts",
                     column_key: str = "prompt_column") -> list[str]:
    """Prompts from a .txt file (one per line) or a .parquet/.csv `column`; blank entries dropped.

    `key` and `column_key` name the config settings in error messages, so users know what to fix.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{key} {path} is a folder; name a .txt file (one prompt per line) or a "
                                f".parquet/.csv with a {column!r} column")
    if not path.is_file():
        raise FileNotFoundError(f"{key} {path} does not exist (a .txt file, one prompt per line, or a "
                                f".parquet/.csv with a {column!r} column)")
    if path.suffix.lower() not in (".txt", "", ".parquet", ".csv"):
        # Read as lines, a .json list or a .yaml file would train on its brackets and quotes.
        raise ValueError(f"{key} {path}: a {path.suffix} file is not a prompts file; give a .txt file (one "
                         f"prompt per line) or a .parquet/.csv with a {column!r} column")
    if path.suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = (pd.read_parquet(path) if path.suffix == ".parquet"
                 else pd.read_csv(path, encoding="utf-8-sig"))
        if column not in frame.columns:
            raise ValueError(f"{path} has no column {column!r} (columns: {list(frame.columns)}); set "
                             f"{column_key}")
        cells = frame[column]
        if cells.isna().any():  # astype(str) would train on the prompts "None" and "nan"
            logger.warning("%s: %d empty (null) cell(s) in column %r skipped", path, int(cells.isna().sum()),
                           column)
        prompts = cells.dropna().astype(str).tolist()
    else:
        try:
            # utf-8-sig drops a byte-order mark (Windows editors write one); it would start the first prompt.
            prompts = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{key} {path} is not UTF-8 text ({err.reason} at byte {err.start}): give "
                             "a .txt file of prompts, one per line, saved as UTF-8 (or a .parquet/.csv)"
                             ) from err
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def training_prompts(cfg) -> list[str]:
    """Training prompts of a ReFL config's `data`: a .txt (one per line), .parquet or .csv file, or the inline
    list."""
    if cfg.prompts_file is not None:
        return read_prompt_file(cfg.prompts_file, cfg.prompt_column, "data.prompts_file",
                                "data.prompt_column")
    prompts = [p.strip() for p in cfg.prompts if p and p.strip()]
    if not prompts:
        raise ValueError("no training prompts: set data.prompts_file or data.prompts")
    return prompts


CHECKED_PROMPTS = 10_000  # tokenizing more would slow the start of a large prompt set for a warning


def warn_if_truncated(prompts: list[str], tokenizer, setting: str) -> int:
    """Log once how many of the first `CHECKED_PROMPTS` prompts are longer than the text encoder reads
    (their tail is cut, as the stock pipelines cut it), with the first one; returns how many."""
    checked = list(prompts[:CHECKED_PROMPTS])
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(checked, truncation=False, verbose=False).input_ids]  # +BOS, EOS
    long = [p for p, n in zip(checked, lengths) if n > limit]
    if long:
        logger.warning(
            "%d of the %s%d prompts of %s are longer than the text encoder's %d tokens: their ends are cut "
            "(as the stock pipeline cuts them), e.g. %r", len(long), "first " if len(prompts) > len(checked)
            else "", len(checked), setting, limit, long[0][:120] + ("..." if len(long[0]) > 120 else ""))
    return len(long)


def seed_for(*parts: int) -> int:
    """A seed derived from several integers (run seed, update, micro-batch, rank): distinct tuples, unrelated
    seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def prompts_for(prompts: list[str], seed: int, start: int, count: int) -> list[str]:
    """Items [start, start + count) of the endless stream of per-epoch shuffles of `prompts`."""
    n = len(prompts)
    out = []
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        perm = np.random.default_rng(seed_for(seed, epoch)).permutation(n)
        out.append(prompts[perm[pos]])
    return out
