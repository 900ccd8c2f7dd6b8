"""Small pairs sets in memory: `load_pairs` reads and checks every row once, `PairDataset` serves them.

For training at scale use `reward.data.stream.PairShards`, which streams."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from reward.data.errors import BadRows, DataError, EmptySplitError
from reward.data.formats import PairRecord, check_format
from reward.data.pairs import (
    apply_tie_policy,
    check_duplicate_policy,
    find_duplicates,
    pair_item,
    prompt_in_val,
    report_duplicates,
    resolve_tie_policy,
    row_pair_keys,
    row_problems,
)
from reward.data.sources import read_tables

logger = logging.getLogger(__name__)


def load_pairs(
    source,
    fmt: str = "auto",
    tie_policy: str = "auto",
    loss_handles_ties: bool = False,
    on_bad_row: str = "error",
    check_images: bool = True,
    max_reported: int = 5,
    duplicate_pairs: str = "drop",
    counts: dict | None = None,
) -> list[PairRecord]:
    """Read a small `source` (path, glob, folder or DataFrame) into validated `PairRecord`s in memory.

    tie_policy: keep (label 0.5; for pairwise/pickscore), drop, half (kept as an ordinary pair at weight
    0.5), auto (keep if the loss handles ties, else drop). Bad rows raise `DataError`, or with
    on_bad_row=skip are dropped and counted in the log. A pair that repeats an earlier one (same prompt,
    images and label: `reward.data.pairs.row_pair_keys`) is counted, logged and, with duplicate_pairs=drop,
    left out. `counts`, when given, receives {"bad_rows", "duplicate_pairs"}.
    """
    bad = BadRows(on_bad_row, max_reported)
    tie_policy = resolve_tie_policy(tie_policy, loss_handles_ties)
    check_duplicate_policy(duplicate_pairs)
    records: list[PairRecord] = []
    keys: list[int] = []
    places: list[tuple[str, int]] = []  # each record's file and row, for the log of repeats
    n_ties_dropped = n_rows = 0
    where = "<DataFrame>" if isinstance(source, pd.DataFrame) else str(source)
    for df, name, base in read_tables(source):
        spec = check_format(fmt, list(df.columns), name)
        rows = df.to_dict("records")
        n_rows += len(rows)
        for idx, row in enumerate(tqdm(rows, desc=f"checking {Path(name).name}", disable=len(rows) < 2000)):
            row_records, problems = row_problems(spec, row, base, idx, check_images)
            if problems:
                bad.add(f"{name}, row {idx}: {'; '.join(problems)}")
                continue
            for rec, key in zip(row_records, row_pair_keys(spec, row, base)):
                if apply_tie_policy(rec, tie_policy) is None:
                    n_ties_dropped += 1
                    continue
                records.append(rec)
                keys.append(key)
                places.append((name, idx))
    bad.log(where, n_rows)
    if n_ties_dropped:
        logger.info("%s: dropped %d tied pair(s) (tie_policy=drop)", where, n_ties_dropped)
    repeats, originals = find_duplicates(keys)
    report_duplicates(where, len(repeats), len(records),
                      [(places[i], places[j]) for i, j in zip(repeats[:3], originals[:3])],
                      duplicate_pairs, key="duplicate_pairs")
    if duplicate_pairs == "drop" and len(repeats):
        dropped = set(repeats.tolist())
        records = [rec for i, rec in enumerate(records) if i not in dropped]
    if counts is not None:
        counts.update(bad_rows=bad.count, duplicate_pairs=len(repeats))
    if not records:
        raise EmptySplitError(f"{where}: no valid preference pair ({n_rows} row(s), {bad.count} bad, "
                              f"{n_ties_dropped} ties dropped). Check the file's contents.")
    return records


class PairDataset(Dataset):
    """In-memory records (from `load_pairs`). Items: prompt, pos/neg image tensors (3, S, S) in
    [0, 1], label, weight (`reward.data.pairs.pair_item`)."""

    def __init__(self, records: list[PairRecord], image_size: int):
        self.records = records
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        try:
            return pair_item(rec, self.image_size)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"row {rec.row}: {err}") from err


def split_by_prompt(records: list[PairRecord], val_fraction: float):
    """Held-out prompts, not held-out pairs: a prompt's pairs all land on one side, the side
    `prompt_in_val` gives it (the same split training makes on a streamed source)."""
    val = [prompt_in_val(r.prompt, val_fraction) for r in records]
    return [r for r, v in zip(records, val) if not v], [r for r, v in zip(records, val) if v]
