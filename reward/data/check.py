"""The checking pass (social-refl-check-pairs): every image of every row decoded once, a report of the bad
rows and a clean copy of the good ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from reward.data.errors import DataError
from reward.data.formats import Format, check_format, resolve_image
from reward.data.pairs import check_duplicate_policy, report_duplicates, row_pair_keys, row_problems
from reward.data.sources import ShardReader


class _BlockCheck(Dataset):
    """Item b = the bad rows of row group b as [(row in file, reason)], every image decoded (in workers), and
    the good rows' pair keys as [(row in file, keys)] (`row_pair_keys`)."""

    def __init__(self, reader: ShardReader, spec: Format):
        self.reader, self.spec = reader, spec

    def __len__(self) -> int:
        return len(self.reader.blocks)

    def __getitem__(self, b: int) -> tuple[list[tuple[int, str]], list[tuple[int, list[int]]]]:
        data = self.reader.read(b).to_pydict()
        bad, good = [], []
        for r in range(self.reader.blocks[b][3]):
            _, file_row, base = self.reader.where(b, r)
            row = {c: v[r] for c, v in data.items()}
            _, problems = row_problems(self.spec, row, base, file_row, True)
            if problems:
                bad.append((file_row, "; ".join(problems)))
            else:
                good.append((file_row, row_pair_keys(self.spec, row, base)))
        return bad, good


class _Repeats:
    """The repeated pairs met so far, over every block in order: a row all of whose pairs repeat earlier
    ones is a repeated row (left out of the clean copy with duplicate_pairs=drop)."""

    def __init__(self, max_listed: int):
        self.first: dict[int, tuple[str, int]] = {}  # key -> (file, row) of its first pair
        self.n_pairs, self.n_rows, self.listed, self.max_listed = 0, 0, [], max_listed

    def rows(self, path: str, good: list[tuple[int, list[int]]]) -> list[int]:
        """The repeated rows (row in file) among one block's good rows; counts their repeated pairs."""
        repeated = []
        for file_row, keys in good:
            earlier = [self.first[k] for k in keys if k in self.first]
            self.n_pairs += len(earlier)
            for k in keys:
                self.first.setdefault(k, (path, file_row))
            if keys and len(earlier) == len(keys):
                repeated.append(file_row)
                self.n_rows += 1
                if len(self.listed) < self.max_listed:
                    self.listed.append({"file": path, "row": file_row, "repeats": {"file": earlier[0][0],
                                                                                  "row": earlier[0][1]}})
        return repeated


def _absolute_paths(table, spec: Format, base: Path):
    """Relative image paths made absolute, so the clean file works wherever it is written."""
    import pyarrow as pa

    for name in spec.path_columns:
        values = table.column(name).to_pylist()
        if spec.image_list:
            values = [[resolve_image(p, base) for p in v] if v is not None else v for v in values]
        else:
            values = [resolve_image(v, base) if v is not None else v for v in values]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    return table


def _write_clean(f, reader: ShardReader, spec: Format, loader, problems: list[dict], max_listed: int,
                 row_group_size: int, repeats: _Repeats, drop_repeats: bool) -> tuple[int, int]:
    """Stream the good rows into the open file `f`, block by block (rows that only repeat earlier pairs left
    out with `drop_repeats`); returns (rows, bad rows)."""
    import pyarrow.parquet as pq

    writer, n_rows, n_bad = None, 0, 0
    for b, (bad, good) in enumerate(tqdm(loader, desc=f"checking {reader.source}", total=len(reader.blocks))):
        si, _, start, n = reader.blocks[b]
        n_rows, n_bad = n_rows + n, n_bad + len(bad)
        for file_row, reason in bad:
            if len(problems) < max_listed:
                problems.append({"file": reader.shards[si].path, "row": file_row, "reason": reason})
        repeated = repeats.rows(reader.shards[si].path, good)
        keep = np.ones(n, dtype=bool)
        keep[[file_row - start for file_row, _ in bad]] = False
        if drop_repeats:
            keep[[file_row - start for file_row in repeated]] = False
        table = _absolute_paths(reader.read(b).filter(keep), spec, Path(reader.shards[si].base))
        if writer is None:
            writer = pq.ParquetWriter(f, table.schema)
        writer.write_table(table.cast(writer.schema), row_group_size=row_group_size)
    if writer is not None:
        writer.close()
    return n_rows, n_bad


def check_pairs(source, out: str | os.PathLike, report: str | os.PathLike | None = None, fmt: str = "auto",
                num_workers: int = 0, row_group_size: int = 256, max_listed: int = 10_000,
                duplicate_pairs: str = "drop") -> dict:
    """Decode every image of every row once; write the good rows to `out` (parquet, written to a
    temp file then renamed; relative image paths made absolute) and a JSON report of the bad rows
    (file, row, reason) and of the repeated ones to `report`. Pairs that repeat an earlier pair (same prompt,
    images and label) are counted; a row made only of such pairs is listed and, with duplicate_pairs=drop,
    left out of the clean copy. Reads one row group at a time; workers decode in parallel."""
    from runkit.files import atomic_write_bytes

    out = Path(out)
    if out.suffix not in (".parquet", ".pq"):
        raise DataError(f"--output-file {out}: the clean pairs file is written as parquet; name it *.parquet")
    if out.is_dir():
        raise DataError(f"--output-file {out} is a folder; name the clean .parquet file to write")
    if report is not None and Path(report).is_dir():
        raise DataError(f"--report-file {report} is a folder; name the .json report to write")
    check_duplicate_policy(duplicate_pairs)
    reader = ShardReader(source)
    spec = check_format(fmt, reader.columns, reader.source)
    loader = torch.utils.data.DataLoader(_BlockCheck(reader, spec), batch_size=None, num_workers=num_workers)
    problems: list[dict] = []
    repeats = _Repeats(max_listed)
    counts = {}

    def write(f):
        counts["rows"], counts["bad"] = _write_clean(f, reader, spec, loader, problems, max_listed,
                                                     row_group_size, repeats, duplicate_pairs == "drop")

    atomic_write_bytes(out, write)
    examples = [((r["file"], r["row"]), (r["repeats"]["file"], r["repeats"]["row"]))
                for r in repeats.listed[:3]]
    report_duplicates(reader.source, repeats.n_pairs, len(repeats.first) + repeats.n_pairs, examples,
                      duplicate_pairs, key="duplicate_pairs")
    good = counts["rows"] - counts["bad"]
    result = {"source": reader.source, "format": spec.name, "shards": len(reader.shards),
              "rows": counts["rows"],
              "good_rows": good, "bad_rows": counts["bad"], "listed": len(problems),
              "duplicate_pairs": repeats.n_pairs, "duplicate_rows": repeats.n_rows,
              "clean_rows": good - (repeats.n_rows if duplicate_pairs == "drop" else 0),
              "clean": str(out), "problems": problems, "duplicates": repeats.listed}
    if report is not None:
        text = json.dumps(result, indent=2).encode()
        atomic_write_bytes(report, lambda f: f.write(text))
    return result
