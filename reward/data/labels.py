"""Per-image feedback: one image, its prompt and whether it was liked (1) or not (0), one row each.

The labelled counterpart of the pair formats, for objectives that learn from single judgements (Diffusion-KTO
in preference/). A table is read by the same readers as pairs (`sources`: a file, a folder or glob of
shards, a `datasets` save_to_disk folder), indexed from its cheap columns and streamed as pairs are
(`LabelShards` is a `PairShards` whose items are single images, so `PairShardSampler` deals it out), with
the same bad-row policy: an empty prompt, a label that is not 0/1 (or true/false), a missing or undecodable
image stop the run naming the file and the row, or with on_bad_row=skip are dropped and counted. A row that
repeats an earlier one (same prompt, image and label) is counted and dropped as a repeated pair is
(duplicate_pairs).

Where such labels come from: a community's remixes (a remixed image is liked, one seen and not remixed is
not: toyworld/community.py's pairs hold exactly those two kinds), likes, thumbs up/down.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from reward.data.errors import FIX, DataError, check_on_bad_row
from reward.data.formats import Format, _number, resolve_image
from reward.data.pairs import check_duplicate_policy, entry_key, image_identity
from reward.data.sources import ShardReader
from reward.data.stream import PairShards
from reward.images import describe, image_bytes
from reward.model import load_image_tensor

TRUE_WORDS, FALSE_WORDS = ("true", "yes", "liked"), ("false", "no", "not liked")


def label_value(cell) -> float:
    """A liked / not-liked cell as 1.0 / 0.0; raises ValueError with the reason otherwise."""
    if isinstance(cell, str):
        word = cell.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return 1.0 if word in TRUE_WORDS else 0.0
    number = _number(cell)
    if number not in (0.0, 1.0):
        raise ValueError(f"label={cell!r}: a label is 1 (liked) or 0 (not liked), or true/false")
    return number


def _labelled_check(row: Mapping) -> list:
    label_value(row["label"])  # raises on a bad label; a labelled row holds no pair
    return []


# One record per labelled format (the Format of the pair formats, with `labels` = the liked column and no
# preferences); not in PAIR_FORMATS, so a labelled table is never taken for pairs.
LABEL_FORMATS: dict[str, Format] = {
    # prompt, image (a path, relative to the file's folder), label (1 liked / 0 not liked).
    "labelled": Format("labelled", "prompt", ("image",), ("label",), holds_paths=True, ordered=False,
                       preferences=_labelled_check),
}


def check_label_format(fmt: str, columns: list[str], where: str) -> Format:
    """The record of `fmt` ("auto": the labelled format whose columns the table has)."""
    if fmt == "auto":
        fmt = next((name for name, spec in LABEL_FORMATS.items() if all(c in columns for c in spec.columns)),
                   "labelled")
    if fmt not in LABEL_FORMATS:
        raise DataError(f"unknown labelled-image format {fmt!r}; choose one of {', '.join(LABEL_FORMATS)} "
                        "or auto")
    spec = LABEL_FORMATS[fmt]
    missing = [c for c in spec.columns if c not in columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing} for labelled images (found {list(columns)}); "
                        f"a {fmt} table needs columns {spec.columns}")
    return spec


class LabelShards(PairShards):
    """The streaming labelled-images dataset: item i = one image (3, S, S) in [0, 1], its prompt, its label
    (1.0 liked, 0.0 not) and weight 1; indexed and checked from the cheap columns (prompt, label, path)
    before any image is decoded. `labels` holds every item's label. Otherwise as `PairShards`."""

    def __init__(self, source, image_size: int, fmt: str = "auto", on_bad_row: str = "error",
                 split: str | None = None, val_fraction: float = 0.0, cache_blocks: int = 4,
                 duplicate_pairs: str = "drop"):
        self.on_bad_row = check_on_bad_row(on_bad_row)
        self.duplicate_pairs = check_duplicate_policy(duplicate_pairs)
        self.tie_policy = "keep"  # labels have no ties; PairShards' index reads it
        if split not in (None, "train", "val"):
            raise DataError(f"split must be None, 'train' or 'val', got {split!r}")
        self.reader = ShardReader(source)
        self.format = check_label_format(fmt, self.reader.columns, self.reader.source)
        self.fmt = self.format.name
        self.image_size = image_size
        self.cache_blocks = max(1, cache_blocks)
        self._cache = OrderedDict()
        self._build_index(split, val_fraction)

    _entry_noun = "labelled image"

    def _row_entries(self, b: int, r: int, row: dict, base: Path) -> list[tuple[tuple, int]]:
        """One index entry (block, row, 0, label) per checked row, the image and its label, with its key:
        the same prompt, image and label is a repeat."""
        label, spec = label_value(row["label"]), self.format
        image = image_identity(resolve_image(row[spec.images[0]], base))
        return [((b, r, 0, label), entry_key(row[spec.prompt], image, label=label))]

    def __getitem__(self, i: int) -> dict:
        row, path, file_row, base = self.row(i)
        spec = self.format
        ref = resolve_image(row[spec.images[0]], base)
        try:
            return {"prompt": row[spec.prompt],
                    "image": load_image_tensor(image_bytes(ref), self.image_size, describe(ref)),  # (3, S, S)
                    "label": torch.tensor(float(self.labels[i]), dtype=torch.float32),
                    "weight": torch.tensor(1.0, dtype=torch.float32)}
        except (FileNotFoundError, ValueError) as err:
            msg = f"{path}, row {file_row}: {err}"
        if self.on_bad_row == "error":
            raise DataError(msg + FIX)
        return {"bad": msg}


def collate_labelled(items: list[dict]) -> dict:
    """Stack good items; bad ones (on_bad_row=skip) are dropped and counted in `n_bad` / `bad`."""
    bad = [it["bad"] for it in items if "bad" in it]
    items = [it for it in items if "bad" not in it]
    if not items:
        return {"prompt": [], "n_bad": len(bad), "bad": bad}
    return {"prompt": [it["prompt"] for it in items],
            "image": torch.stack([it["image"] for it in items]),  # (B, 3, S, S)
            "label": torch.stack([it["label"] for it in items]),  # (B,)
            "weight": torch.stack([it["weight"] for it in items]),  # (B,)
            "n_bad": len(bad), "bad": bad}
