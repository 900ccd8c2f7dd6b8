"""Preference pairs from the files people have.

Formats (`fmt`):
- `social`: Social Reward parquet/CSV with `prompt, pos_path, neg_path` (relative paths resolve
  against the file's folder);
- `pickapic`: Pick-a-Pic v2 parquet with `caption, jpg_0, jpg_1, label_0, label_1` (encoded bytes;
  a tie is 0.5/0.5);
- `ranked`: ImageRewardDB / HPD v2 style, one row per prompt with `prompt`, `image_path` (a list)
  and `rank` (a list, 1 = best), expanded to every pair of differently (or equally: a tie) ranked images.

Bad input raises `DataError` naming the file, the row and the fix; with `on_bad_row="skip"` bad
rows are dropped and the count plus the first offenders are logged.
"""

from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from reward.model import load_image_tensor

logger = logging.getLogger(__name__)

FORMAT_COLUMNS = {
    "social": ["prompt", "pos_path", "neg_path"],
    "pickapic": ["caption", "jpg_0", "jpg_1", "label_0", "label_1"],
    "ranked": ["prompt", "image_path", "rank"],
}
TIE_POLICIES = ("auto", "keep", "drop", "half")
ImageRef = Union[str, bytes]


class DataError(ValueError):
    """Bad preference data; the message names the file, the row and how to fix it."""


@dataclass
class PairRecord:
    prompt: str
    pos: ImageRef  # a path, or encoded image bytes
    neg: ImageRef
    label: float = 1.0  # probability that `pos` is preferred (0.5 = tie)
    weight: float = 1.0  # loss weight
    row: int = -1  # row in the source file, for error messages


def _read_table(source) -> tuple[pd.DataFrame, str, Path]:
    if isinstance(source, pd.DataFrame):
        return source.reset_index(drop=True), "<DataFrame>", Path.cwd()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    try:
        if path.suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif path.suffix == ".csv":
            df = pd.read_csv(path)
        elif path.suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=path.suffix == ".jsonl")
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .csv, .json or .jsonl")
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot be read as a table ({err})") from err
    return df, str(path), path.parent.resolve()


def detect_format(df: pd.DataFrame, where: str) -> str:
    for fmt, cols in FORMAT_COLUMNS.items():
        if all(c in df.columns for c in cols):
            return fmt
    raise DataError(
        f"{where}: cannot tell the data format from columns {list(df.columns)}. Expected one of: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMAT_COLUMNS.items())
        + ". Rename the columns or pass fmt= explicitly."
    )


def _check_image(ref: ImageRef) -> str | None:
    """None if the image decodes, else the reason it does not."""
    try:
        if isinstance(ref, (bytes, bytearray)):
            with Image.open(io.BytesIO(ref)) as im:
                im.load()
        else:
            if not Path(ref).is_file():
                return f"image {ref} does not exist"
            with Image.open(ref) as im:
                im.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"image {ref if isinstance(ref, str) else '<bytes>'} is corrupt or truncated ({err})"
    return None


def _resolve(p, base: Path) -> str:
    p = Path(str(p))
    return str(p if p.is_absolute() else base / p)


def _records_from_row(fmt: str, row: pd.Series, base: Path, idx: int) -> list[PairRecord]:
    if fmt == "social":
        return [PairRecord(row["prompt"], _resolve(row["pos_path"], base), _resolve(row["neg_path"], base), row=idx)]
    if fmt == "pickapic":
        l0, l1 = float(row["label_0"]), float(row["label_1"])
        if l0 + l1 <= 0:
            raise ValueError(f"label_0 + label_1 = {l0 + l1}; labels must be 1/0, 0/1 or 0.5/0.5")
        p0 = l0 / (l0 + l1)
        pos, neg = (row["jpg_0"], row["jpg_1"]) if p0 >= 0.5 else (row["jpg_1"], row["jpg_0"])
        return [PairRecord(row["caption"], pos, neg, label=max(p0, 1 - p0), row=idx)]
    paths, ranks = list(row["image_path"]), list(row["rank"])
    if len(paths) != len(ranks):
        raise ValueError(f"image_path has {len(paths)} entries but rank has {len(ranks)}")
    out = []
    for (pa, ra), (pb, rb) in itertools.combinations(zip(paths, ranks), 2):
        if ra > rb:
            (pa, ra), (pb, rb) = (pb, rb), (pa, ra)
        out.append(PairRecord(row["prompt"], _resolve(pa, base), _resolve(pb, base),
                              label=0.5 if ra == rb else 1.0, row=idx))
    return out


def load_pairs(
    source,
    fmt: str = "auto",
    tie_policy: str = "auto",
    loss_handles_ties: bool = False,
    on_bad_row: str = "error",
    check_images: bool = True,
    max_reported: int = 5,
) -> list[PairRecord]:
    """Read `source` (path or DataFrame) into validated `PairRecord`s.

    tie_policy: keep (label 0.5; for pairwise/pickscore), drop, half (kept as an ordinary pair at
    weight 0.5), auto (keep if the loss handles ties, else drop).
    """
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if tie_policy not in TIE_POLICIES:
        raise DataError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if tie_policy == "auto":
        tie_policy = "keep" if loss_handles_ties else "drop"
    df, where, base = _read_table(source)
    fmt = detect_format(df, where) if fmt == "auto" else fmt
    if fmt not in FORMAT_COLUMNS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMAT_COLUMNS)} or auto")
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in df.columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} for format {fmt!r} (found {list(df.columns)}). "
            f"A {fmt} file needs columns {FORMAT_COLUMNS[fmt]}."
        )
    prompt_col = "caption" if fmt == "pickapic" else "prompt"
    records: list[PairRecord] = []
    bad: list[str] = []
    n_ties_dropped = 0
    rows = df.to_dict("records")
    for idx, raw in enumerate(tqdm(rows, desc=f"checking {Path(where).name}", disable=len(rows) < 2000)):
        row = pd.Series(raw)
        prompt = row[prompt_col]
        problems: list[str] = []
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"empty or missing {prompt_col}")
        row_records: list[PairRecord] = []
        if not problems:
            try:
                row_records = _records_from_row(fmt, row, base, idx)
            except Exception as err:
                problems.append(str(err))
        if check_images and not problems:
            for rec in row_records:
                for ref in (rec.pos, rec.neg):
                    reason = _check_image(ref)
                    if reason:
                        problems.append(reason)
        if problems:
            msg = f"{where}, row {idx}: {'; '.join(problems)}"
            if on_bad_row == "error":
                raise DataError(msg + ". Fix or remove the row, or set on_bad_row=skip to drop bad rows.")
            bad.append(msg)
            continue
        for rec in row_records:
            if rec.label == 0.5:
                if tie_policy == "drop":
                    n_ties_dropped += 1
                    continue
                if tie_policy == "half":
                    rec.label, rec.weight = 1.0, 0.5
            records.append(rec)
    if bad:
        logger.warning("%s: skipped %d bad row(s) of %d; first: %s", where, len(bad), len(rows),
                       " | ".join(bad[:max_reported]))
    if n_ties_dropped:
        logger.info("%s: dropped %d tied pair(s) (tie_policy=drop)", where, n_ties_dropped)
    if not records:
        raise DataError(f"{where}: no valid preference pair ({len(rows)} row(s), {len(bad)} bad, "
                        f"{n_ties_dropped} ties dropped). Check the file's contents.")
    return records


def _open(ref: ImageRef, size: int, rec: PairRecord) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(ref)) if isinstance(ref, (bytes, bytearray)) else ref
        return load_image_tensor(image, size)
    except (OSError, ValueError) as err:
        raise DataError(f"row {rec.row}: {err}") from err


class PairDataset(Dataset):
    """Items: prompt, pos/neg image tensors (3, S, S) in [0, 1], label, weight."""

    def __init__(self, records: list[PairRecord], image_size: int):
        self.records = records
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        return {
            "prompt": rec.prompt,
            "pos": _open(rec.pos, self.image_size, rec),
            "neg": _open(rec.neg, self.image_size, rec),
            "label": torch.tensor(rec.label, dtype=torch.float32),
            "weight": torch.tensor(rec.weight, dtype=torch.float32),
        }


def collate_pairs(items: list[dict]) -> dict:
    return {
        "prompt": [it["prompt"] for it in items],
        "pos": torch.stack([it["pos"] for it in items]),  # (B, 3, S, S)
        "neg": torch.stack([it["neg"] for it in items]),  # (B, 3, S, S)
        "label": torch.stack([it["label"] for it in items]),  # (B,)
        "weight": torch.stack([it["weight"] for it in items]),  # (B,)
    }


def split_by_prompt(records: list[PairRecord], val_fraction: float, seed: int = 0):
    """Held-out prompts, not held-out pairs: a prompt's pairs all land on one side."""
    import random

    prompts = sorted({r.prompt for r in records})
    random.Random(seed).shuffle(prompts)
    n_val = int(round(len(prompts) * val_fraction))
    val_prompts = set(prompts[:n_val])
    return [r for r in records if r.prompt not in val_prompts], [r for r in records if r.prompt in val_prompts]

