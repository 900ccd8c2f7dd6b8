"""The data formats: one `Format` record each, and what every part of the package reads from it.

A record says which columns a format has, which of them are cheap (read when indexing a set, never the
image bytes), which hold image paths, and how a row's labels become preferences, checked. Everything else
(loading, streaming, the checking pass, the majority baseline, the command-line choices) works from the
record, so a new format is one record in `PAIR_FORMATS` plus its test.

A row's preferences are (i, j, p): images i and j of the row, p = the probability that image i is preferred
(1 or 0 for a clear pair, 0.5 for a tie). Labels that give no such probability are a bad row, with the
reason, before any image is decoded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from reward.data.errors import DataError

ImageRef = Union[str, bytes, dict]  # a path, encoded bytes, or a `datasets` Image cell {"bytes", "path"}
Preference = tuple[int, int, float]  # (image i, image j, probability that i is preferred)
URL_SCHEMES = ("http://", "https://", "s3://", "gs://", "hf://")


@dataclass
class PairRecord:
    prompt: str
    pos: ImageRef  # a path, or encoded image bytes
    neg: ImageRef
    label: float = 1.0  # probability that `pos` is preferred (0.5 = tie)
    weight: float = 1.0  # loss weight
    row: int = -1  # row in the source file, for error messages


@dataclass(frozen=True)
class Format:
    """One data format (see the module docstring)."""

    name: str
    prompt: str  # the prompt column
    images: tuple[str, ...]  # columns holding the row's images
    labels: tuple[str, ...]  # columns the preferences are read from (besides `images` for list formats)
    holds_paths: bool  # images are paths, resolved against the file's folder (else encoded bytes)
    ordered: bool  # the file lists a pair's images in an order a score could learn (the majority baseline)
    preferences: Callable[[Mapping], list[Preference]]  # checked; raises ValueError with the reason
    image_list: bool = False  # `images` is one column holding a list of images per row
    # Optional columns naming each image of `images` (read when a table has them): what tells two rows'
    # images apart when looking for repeated pairs, without reading the images' bytes.
    image_ids: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        return [self.prompt, *self.images, *self.labels]

    @property
    def cheap(self) -> list[str]:
        """Columns an index reads: prompt, labels and paths; never encoded images."""
        return [self.prompt, *self.labels, *self.path_columns]

    @property
    def path_columns(self) -> tuple[str, ...]:
        return self.images if self.holds_paths else ()

    def image_cells(self, row: Mapping) -> list[tuple[str, object]]:
        """(column, cell) of each of a row's images, in the order `preferences` index them."""
        if self.image_list:
            return [(self.images[0], cell) for cell in as_list(row[self.images[0]], self.images[0])]
        return [(c, row[c]) for c in self.images]


def _number(value) -> float | None:
    """A finite number, or None (NaN, inf, None, text...)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def as_list(value, column: str) -> list:
    """A list cell (list, tuple, array); text is refused, since list(text) would split it into characters."""
    if isinstance(value, str):
        raise ValueError(f"{column} is text ({value[:40]!r}), not a list: a CSV cannot hold lists; store the "
                         "set as parquet or jsonl")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{column} is empty")
    try:
        return list(value)
    except TypeError as err:
        raise ValueError(f"{column} is a {type(value).__name__}, not a list") from err


def _social_preferences(row: Mapping) -> list[Preference]:
    return [(0, 1, 1.0)]  # the preferred image is named by its column


def _pickapic_preferences(row: Mapping) -> list[Preference]:
    l0, l1 = _number(row["label_0"]), _number(row["label_1"])
    if l0 is None or l1 is None or not (0 <= l0 <= 1 and 0 <= l1 <= 1 and abs(l0 + l1 - 1) <= 1e-6):
        raise ValueError(f"label_0={row['label_0']}, label_1={row['label_1']}: labels must be probabilities "
                         "summing to 1 (1/0, 0/1, or 0.5/0.5 for a tie)")
    return [(0, 1, l0)]


def _ranked_preferences(row: Mapping) -> list[Preference]:
    paths, ranks = as_list(row["image_path"], "image_path"), as_list(row["rank"], "rank")
    if len(paths) != len(ranks):
        raise ValueError(f"image_path has {len(paths)} entries but rank has {len(ranks)}")
    if len(ranks) < 2:
        raise ValueError(f"fewer than 2 images ({len(ranks)}): a ranked row needs two to make a pair")
    values = [_number(r) for r in ranks]
    if None in values:
        raise ValueError(f"rank {ranks} holds {ranks[values.index(None)]!r}, not a number; every image needs "
                         "a rank (1 = best)")
    return [(i, j, 1.0 if values[i] < values[j] else 0.5 if values[i] == values[j] else 0.0)
            for i, j in itertools.combinations(range(len(values)), 2)]


PAIR_FORMATS: dict[str, Format] = {
    # Social Reward: relative paths resolve against the file's folder.
    "social": Format("social", "prompt", ("pos_path", "neg_path"), (), holds_paths=True, ordered=False,
                     preferences=_social_preferences),
    # Pick-a-Pic v2: encoded bytes; a tie is 0.5/0.5.
    # Its downloads name each image (image_0_uid, image_1_uid): repeats are found without reading the bytes.
    "pickapic": Format("pickapic", "caption", ("jpg_0", "jpg_1"), ("label_0", "label_1"), holds_paths=False,
                       ordered=True, preferences=_pickapic_preferences,
                       image_ids=("image_0_uid", "image_1_uid")),
    # ImageRewardDB / HPD v2: one row per prompt, every pair of its images (1 = best; equal ranks: a tie).
    "ranked": Format("ranked", "prompt", ("image_path",), ("rank",), holds_paths=True, ordered=True,
                     preferences=_ranked_preferences, image_list=True),
}


def detect_format(df, where: str) -> str:
    """The format whose columns a table (or a list of column names) has."""
    columns = list(df.columns) if hasattr(df, "columns") else list(df)
    for name, spec in PAIR_FORMATS.items():
        if all(c in columns for c in spec.columns):
            return name
    raise DataError(
        f"{where}: cannot tell the data format from columns {columns}. Expected one of: "
        + "; ".join(f"{k}: {', '.join(v.columns)}" for k, v in PAIR_FORMATS.items())
        + ". Rename the columns or pass fmt= explicitly."
    )


def check_format(fmt: str, columns: list[str], where: str) -> Format:
    """The record of `fmt` ("auto": detected), once `columns` are known to hold all of its columns."""
    fmt = detect_format(columns, where) if fmt == "auto" else fmt
    if fmt not in PAIR_FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(PAIR_FORMATS)} or auto")
    missing = [c for c in PAIR_FORMATS[fmt].columns if c not in columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} for format {fmt!r} (found {list(columns)}). "
                        f"A {fmt} file needs columns {PAIR_FORMATS[fmt].columns}.")
    return PAIR_FORMATS[fmt]


def resolve_image(ref, base: Path):
    """A relative image path (or the path of a `datasets` Image cell without bytes) made absolute against
    the folder of the file naming it; encoded bytes stay as they are."""
    if isinstance(ref, dict):
        if ref.get("bytes") is None and ref.get("path"):
            return {**ref, "path": resolve_image(ref["path"], base)}
        return ref
    if isinstance(ref, (bytes, bytearray)):
        return ref
    path = Path(str(ref)).expanduser()
    return str(path if path.is_absolute() else base / path)


def row_records(spec: Format, row: Mapping, base: Path, idx: int) -> list[PairRecord]:
    """A row's pairs, the preferred image first; raises ValueError when its labels give no preference."""
    images = [resolve_image(cell, base) for _, cell in spec.image_cells(row)]
    out = []
    for i, j, p in spec.preferences(row):
        pos, neg = (images[i], images[j]) if p >= 0.5 else (images[j], images[i])
        out.append(PairRecord(row[spec.prompt], pos, neg, label=max(p, 1 - p), row=idx))
    return out


def _path_problem(cell, column: str, base: Path, check_files: bool) -> str | None:
    if cell is None or (isinstance(cell, float) and math.isnan(cell)) \
            or (isinstance(cell, str) and not cell.strip()):
        return f"{column} is empty"
    if not isinstance(cell, str):
        return f"{column} holds a {type(cell).__name__}, not an image path"
    if cell.lower().startswith(URL_SCHEMES):
        return f"{column} is a URL ({cell}); download the images and give their paths"
    if not check_files:
        return None
    path = Path(resolve_image(cell, base))
    if path.is_dir():
        return f"{column} names a folder ({path}), not an image file"
    return None if path.is_file() else f"image {path} does not exist"


def cheap_problems(spec: Format, row: Mapping, base: Path, check_files: bool = True) -> list[str]:
    """What is wrong with a row that its cheap columns show (prompt, labels, paths; with `check_files`,
    whether each named file exists); no image is decoded. Empty when the row passes."""
    prompt = row[spec.prompt]
    if not isinstance(prompt, str) or not prompt.strip():
        return [f"empty or missing {spec.prompt}"]
    try:
        spec.preferences(row)
        cells = spec.image_cells(row) if spec.holds_paths else []
    except ValueError as err:
        return [str(err)]
    problems = [_path_problem(cell, c, base, check_files) for c, cell in cells]
    return list(dict.fromkeys(p for p in problems if p))
