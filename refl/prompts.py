"""Reading prompt lists from files, shared by training, generation and the comparison harness."""

from __future__ import annotations

import os
from pathlib import Path


def read_prompt_file(path: str | os.PathLike, column: str = "prompt", key: str = "prompts",
                     column_key: str = "prompt_column") -> list[str]:
    """Prompts from a .txt file (one per line) or a .parquet/.csv `column`; blank entries dropped.

    `key` and `column_key` name the config settings in error messages, so users know what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key} {path} does not exist (a .txt file, one prompt per line, or a .parquet/.csv "
                                f"with a {column!r} column)")
    if path.suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        if column not in frame.columns:
            raise ValueError(f"{path} has no column {column!r} (columns: {list(frame.columns)}); set {column_key}")
        prompts = frame[column].astype(str).tolist()
    else:
        prompts = path.read_text(encoding="utf-8").splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts
