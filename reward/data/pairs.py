"""Rows to pairs to items: what is wrong with a row, ties, the held-out split, and the one way a pair
becomes a training item (both images decoded by `reward.images.decode_image`), shared by the in-memory
and the streaming datasets."""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from reward.data.errors import DataError
from reward.data.formats import Format, ImageRef, PairRecord, cheap_problems, resolve_image, row_records
from reward.images import decode_image, describe, image_bytes
from reward.model import load_image_tensor

logger = logging.getLogger(__name__)

TIE_POLICIES = ("auto", "keep", "drop", "half")
# What a pair that repeats an earlier one becomes: dropped (counted and logged), or kept (counted and logged:
# e.g. one pair judged alike by several annotators, each judgement meant to count).
DUPLICATE_POLICIES = ("drop", "keep")
SAME_IMAGE = ("both sides of the pair are the same image (same file or same bytes); such a pair teaches "
              "nothing")


def same_image(rec: PairRecord, check_bytes: bool) -> bool:
    """Whether a pair's two sides are one image: the same file always; the same bytes with `check_bytes`
    (bytes held in the table are always compared: they are in memory)."""
    if isinstance(rec.pos, str) and isinstance(rec.neg, str):
        if os.path.realpath(rec.pos) == os.path.realpath(rec.neg):
            return True
        if not check_bytes or not (Path(rec.pos).is_file() and Path(rec.neg).is_file()):
            return False
    try:
        return image_bytes(rec.pos) == image_bytes(rec.neg)
    except (FileNotFoundError, ValueError):
        return False


def _image_problems(records: list[PairRecord]) -> list[str]:
    """Why a row's images do not decode (each distinct image decoded once)."""
    seen, problems = [], []
    for ref in (ref for rec in records for ref in (rec.pos, rec.neg)):
        if ref in seen:
            continue
        seen.append(ref)
        try:
            decode_image(ref)
        except (FileNotFoundError, ValueError) as err:
            problems.append(str(err))
    return list(dict.fromkeys(problems))


def row_problems(spec: Format, row: Mapping, base: Path, idx: int,
                 check_images: bool) -> tuple[list[PairRecord], list[str]]:
    """A row's pairs and what is wrong with it (empty when the row is good): its cheap columns, then with
    `check_images` every image decoded, then whether a pair's two sides are the same image."""
    problems = cheap_problems(spec, row, base)
    if problems:
        return [], problems
    records = row_records(spec, row, base, idx)
    problems = _image_problems(records) if check_images else []
    if not problems and any(same_image(rec, check_bytes=check_images) for rec in records):
        problems.append(SAME_IMAGE)
    return records, problems


def resolve_tie_policy(tie_policy: str, loss_handles_ties: bool) -> str:
    if tie_policy not in TIE_POLICIES:
        raise DataError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if tie_policy == "auto":
        return "keep" if loss_handles_ties else "drop"
    return tie_policy


def apply_tie_policy(rec: PairRecord, tie_policy: str) -> PairRecord | None:
    """keep: a tie stays at label 0.5; drop: None; half: an ordinary pair at weight 0.5."""
    if rec.label == 0.5:
        if tie_policy == "drop":
            return None
        if tie_policy == "half":
            rec.label, rec.weight = 1.0, 0.5
    return rec


def check_duplicate_policy(duplicate_pairs: str, key: str = "duplicate_pairs") -> str:
    if duplicate_pairs not in DUPLICATE_POLICIES:
        raise DataError(f"{key}={duplicate_pairs!r}; choose drop or keep")
    return duplicate_pairs


def image_identity(ref: ImageRef) -> str:
    """What makes two image cells one image when looking for repeated pairs: the same path (made absolute
    and normalised, no file touched) or the same encoded bytes (their digest)."""
    if isinstance(ref, dict):
        ref = ref["bytes"] if ref.get("bytes") is not None else ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return "bytes:" + hashlib.blake2b(ref, digest_size=16).hexdigest()
    return "path:" + os.path.normpath(str(ref))


def entry_key(prompt, *images: str, label: float) -> int:
    """One 64-bit key of an index entry: equal keys = the same prompt, images (in order) and label."""
    text = "\x1f".join([str(prompt), *images, repr(float(label))])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _row_identities(spec: Format, row: Mapping, base: Path) -> list[str]:
    """The identity of each of a row's images: its id column's value where the table has the format's id
    columns (`Format.image_ids`, e.g. Pick-a-Pic's image uids), else `image_identity` of the cell. An empty
    id makes the image one of its own (the streaming index has not read the bytes to compare)."""
    if spec.image_ids and all(c in row for c in spec.image_ids):
        return ["id:" + row[c] if isinstance(row[c], str) and row[c] else "unnamed:" + uuid.uuid4().hex
                for c in spec.image_ids]
    return [image_identity(resolve_image(cell, base)) for _, cell in spec.image_cells(row)]


def row_pair_keys(spec: Format, row: Mapping, base: Path) -> list[int]:
    """One key per preference of a checked row, in `spec.preferences` order: two pairs share a key when
    they have the same prompt, the same preferred and rejected image and the same label (a tie's two images
    in either order). The one definition of a repeated pair, for every format and reader."""
    images = _row_identities(spec, row, base)
    keys = []
    for i, j, p in spec.preferences(row):
        pos, neg = (images[i], images[j]) if p >= 0.5 else (images[j], images[i])
        if p == 0.5:
            pos, neg = sorted((pos, neg))
        keys.append(entry_key(row[spec.prompt], pos, neg, label=max(p, 1 - p)))
    return keys


def find_duplicates(keys: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(repeats, originals): the positions of entries whose key an earlier entry has, and that earlier
    entry's (the first with the key) position for each."""
    keys = np.asarray(keys, dtype=np.uint64)  # (N,)
    if not len(keys):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]  # (N,) position of each entry's first occurrence
    repeats = np.flatnonzero(first_of != np.arange(len(keys)))
    return repeats, first_of[repeats]


Place = tuple[str, int]  # (file, row in the file)


def report_duplicates(where: str, n_repeats: int, n_entries: int, examples: list[tuple[Place, Place]],
                      duplicate_pairs: str, what: str = "pair", key: str = "data.duplicate_pairs") -> None:
    """The log line of a set's repeated pairs (never silent): how many, what was done, the first few
    (repeat, original) places."""
    if not n_repeats:
        return
    done = (f"dropped ({key}=drop; set keep to count every copy)" if duplicate_pairs == "drop"
            else f"kept ({key}=keep)")
    first = " | ".join(f"{a[0]}, row {a[1]} repeats " + ("" if a[0] == b[0] else f"{b[0]}, ") + f"row {b[1]}"
                       for a, b in examples)
    logger.warning("%s: %d of %d %s(s) repeat an earlier one (same prompt, images and label), %s; first: %s",
                   where, n_repeats, n_entries, what, done, first)


def prompt_in_val(prompt, val_fraction: float) -> bool:
    """Held-out prompts by a stable hash: the same prompt lands on the same side in every process
    and every run, without a global list of prompts."""
    return zlib.crc32(str(prompt).encode()) % 1_000_000 < val_fraction * 1_000_000


def pair_item(rec: PairRecord, image_size: int) -> dict:
    """A pair as datasets hand it over: prompt, pos/neg (3, S, S) in [0, 1], label, weight.

    Both datasets build items here, so the same pair gives the same tensors in memory and streamed. Raises
    FileNotFoundError or ValueError (a corrupt or refused image, or two sides with the same bytes)."""
    pos_bytes, neg_bytes = image_bytes(rec.pos), image_bytes(rec.neg)
    if pos_bytes == neg_bytes:
        raise ValueError(SAME_IMAGE)
    return {
        "prompt": rec.prompt,
        "pos": load_image_tensor(pos_bytes, image_size, describe(rec.pos)),  # (3, S, S)
        "neg": load_image_tensor(neg_bytes, image_size, describe(rec.neg)),  # (3, S, S)
        "label": torch.tensor(rec.label, dtype=torch.float32),
        "weight": torch.tensor(rec.weight, dtype=torch.float32),
    }


def collate_pairs(items: list[dict]) -> dict:
    """Stack good items; bad ones (on_bad_row=skip) are dropped and counted in `n_bad` / `bad`."""
    bad = [it["bad"] for it in items if "bad" in it]
    items = [it for it in items if "bad" not in it]
    if not items:
        return {"prompt": [], "n_bad": len(bad), "bad": bad}
    return {
        "prompt": [it["prompt"] for it in items],
        "pos": torch.stack([it["pos"] for it in items]),  # (B, 3, S, S)
        "neg": torch.stack([it["neg"] for it in items]),  # (B, 3, S, S)
        "label": torch.stack([it["label"] for it in items]),  # (B,)
        "weight": torch.stack([it["weight"] for it in items]),  # (B,)
        "n_bad": len(bad),
        "bad": bad,
    }
