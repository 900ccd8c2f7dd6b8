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
from reward.data.pairs import row_problems
from reward.data.sources import ShardReader


class _BlockCheck(Dataset):
    """Item b = the bad rows of row group b as [(row in file, reason)], every image decoded (in workers)."""

    def __init__(self, reader: ShardReader, spec: Format):
        self.reader, self.spec = reader, spec

    def __len__(self) -> int:
        return len(self.reader.blocks)

    def __getitem__(self, b: int) -> list[tuple[int, str]]:
        data = self.reader.read(b).to_pydict()
        bad = []
        for r in range(self.reader.blocks[b][3]):
            _, file_row, base = self.reader.where(b, r)
            _, problems = row_problems(self.spec, {c: v[r] for c, v in data.items()}, base, file_row, True)
            if problems:
                bad.append((file_row, "; ".join(problems)))
        return bad


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
                 row_group_size: int) -> tuple[int, int]:
    """Stream the good rows into the open file `f`, block by block; returns (rows, bad rows)."""
    import pyarrow.parquet as pq

    writer, n_rows, n_bad = None, 0, 0
    for b, bad in enumerate(tqdm(loader, desc=f"checking {reader.source}", total=len(reader.blocks))):
        si, _, start, n = reader.blocks[b]
        n_rows, n_bad = n_rows + n, n_bad + len(bad)
        for file_row, reason in bad:
            if len(problems) < max_listed:
                problems.append({"file": reader.shards[si].path, "row": file_row, "reason": reason})
        keep = np.ones(n, dtype=bool)
        keep[[file_row - start for file_row, _ in bad]] = False
        table = _absolute_paths(reader.read(b).filter(keep), spec, Path(reader.shards[si].base))
        if writer is None:
            writer = pq.ParquetWriter(f, table.schema)
        writer.write_table(table.cast(writer.schema), row_group_size=row_group_size)
    if writer is not None:
        writer.close()
    return n_rows, n_bad


def check_pairs(source, out: str | os.PathLike, report: str | os.PathLike | None = None, fmt: str = "auto",
                num_workers: int = 0, row_group_size: int = 256, max_listed: int = 10_000) -> dict:
    """Decode every image of every row once; write the good rows to `out` (parquet, written to a
    temp file then renamed; relative image paths made absolute) and a JSON report of the bad rows
    (file, row, reason) to `report`. Reads one row group at a time; workers decode in parallel."""
    from runkit.files import atomic_write_bytes

    out = Path(out)
    if out.suffix not in (".parquet", ".pq"):
        raise DataError(f"--out {out}: the clean pairs file is written as parquet; name it *.parquet")
    reader = ShardReader(source)
    spec = check_format(fmt, reader.columns, reader.source)
    loader = torch.utils.data.DataLoader(_BlockCheck(reader, spec), batch_size=None, num_workers=num_workers)
    problems: list[dict] = []
    counts = {}

    def write(f):
        counts["rows"], counts["bad"] = _write_clean(f, reader, spec, loader, problems, max_listed,
                                                     row_group_size)

    atomic_write_bytes(out, write)
    result = {"source": reader.source, "format": spec.name, "shards": len(reader.shards),
              "rows": counts["rows"],
              "good_rows": counts["rows"] - counts["bad"], "bad_rows": counts["bad"], "listed": len(problems),
              "clean": str(out), "problems": problems}
    if report is not None:
        text = json.dumps(result, indent=2).encode()
        atomic_write_bytes(report, lambda f: f.write(text))
    return result
