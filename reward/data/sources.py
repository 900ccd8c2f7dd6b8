"""Where pairs come from: a file, a directory or glob of shards, or a `datasets` `save_to_disk` folder.

`SUFFIX_KINDS` is the one table of the file types a pairs set may be stored in. `read_tables` reads a small
source whole (pandas); `ShardReader` lists a large one's row groups (parquet) and record batches (Arrow
files as `datasets` writes them) and reads only the blocks a caller asks for.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from reward.data.errors import DataError

# File suffix -> kind. Kinds read in blocks: parquet (row groups) and arrow (an Arrow IPC stream, as
# `datasets` writes it); the others are read whole.
SUFFIX_KINDS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "jsonl",
                ".arrow": "arrow"}
SHARD_KINDS = ("parquet", "arrow")  # what a folder of shards is searched for
_SPLIT_NAME = re.compile(r"^(.+?)-\d{5}-of-\d{5}")


def _suffixes(kinds=None) -> str:
    names = [s for s, k in SUFFIX_KINDS.items() if kinds is None or k in kinds]
    return ", ".join(names[:-1]) + " or " + names[-1]


@dataclass(frozen=True)
class Shard:
    path: str
    kind: str  # a value of SUFFIX_KINDS
    base: str  # the folder relative image paths resolve against


def _shard(path: Path) -> Shard:
    kind = SUFFIX_KINDS.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {_suffixes()} (a datasets "
                        "folder)")
    return Shard(str(path), kind, str(path.parent.resolve()))


def read_whole(path: Path) -> pd.DataFrame:
    """A small file as one table."""
    kind = _shard(Path(path)).kind
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "csv":  # utf-8-sig: a byte-order mark would start the first column's name
            return pd.read_csv(path, encoding="utf-8-sig")
        if kind in ("json", "jsonl"):
            return pd.read_json(path, lines=kind == "jsonl", encoding="utf-8-sig")
        return arrow_stream_table(str(path)).to_pandas()
    except DataError:
        raise
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8 (or "
                        "as parquet)") from None
    except Exception as err:
        raise DataError(f"{path}: cannot be read as a table ({err})") from err


def read_tables(source):
    """(table, name, base folder) per shard of a small source, read whole."""
    if isinstance(source, pd.DataFrame):
        yield source.reset_index(drop=True), "<DataFrame>", Path.cwd()
        return
    for sh in list_shards(source):
        yield read_whole(Path(sh.path)), sh.path, Path(sh.base)


def _glob_shards(text: str) -> list[Shard]:
    paths = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).suffix in SUFFIX_KINDS)
    if not paths:
        raise DataError(f"pairs glob {text} matches no {_suffixes()} file")
    return [_shard(p) for p in paths]


def _datasets_folder(path: Path) -> list[Shard] | None:
    """The shards of a `datasets` save_to_disk folder (None when `path` is not one)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path} is a datasets DatasetDict folder with splits {splits}; point at one split, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        return None
    files = [f["filename"] for f in json.loads((path / "state.json").read_text()).get("_data_files", [])]
    if not files:
        raise DataError(f"{path}/state.json lists no data files; re-save the dataset with save_to_disk")
    return [_shard(path / f) for f in files]


def _folder_shards(path: Path) -> list[Shard]:
    paths = sorted(p for p in path.rglob("*") if SUFFIX_KINDS.get(p.suffix) in SHARD_KINDS and p.is_file())
    if not paths:
        raise DataError(f"{path} holds no {_suffixes(SHARD_KINDS)} shard; point at a pairs file, a shard "
                        "folder or a glob")
    splits = sorted({m.group(1) for m in (_SPLIT_NAME.match(p.name) for p in paths) if m})
    if len(splits) > 1:
        example = next(p for p in paths if p.name.startswith(splits[-1]))
        raise DataError(f"{path} holds shards of several splits ({', '.join(splits)}); point at one split "
                        f"with a glob, e.g. {example.parent / (splits[-1] + '-*' + example.suffix)}")
    return [_shard(p) for p in paths]


def list_shards(source) -> list[Shard]:
    """The files of a pairs source: one file, a glob (`data/train-*.parquet`), a directory of
    parquet/arrow shards (searched recursively), or a `datasets` `save_to_disk` folder."""
    text = str(source)
    if any(c in text for c in "*?["):
        return _glob_shards(text)
    path = Path(text)
    if path.is_file():
        return [_shard(path)]
    if not path.is_dir():
        raise DataError(f"pairs file {path} does not exist")
    return _datasets_folder(path) or _folder_shards(path)


def arrow_stream_table(path: str, batch: int | None = None):
    """A `datasets` Arrow file (IPC stream): the whole table, or only record batch `batch`.

    Memory-mapped: batches before `batch` are skipped without being copied."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        reader = pa.ipc.open_stream(source)
        if batch is None:
            return reader.read_all()
        for i, rb in enumerate(reader):
            if i == batch:
                return pa.Table.from_batches([rb]).combine_chunks()
    raise DataError(f"{path}: has no record batch {batch}; the file changed since it was indexed")


def _layout(sh: Shard) -> tuple[list[str], list[int]]:
    """(column names, rows per block) of one shard, read from its footer or schema where it has one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if sh.kind == "parquet":
        pf = pq.ParquetFile(sh.path)
        return list(pf.schema_arrow.names), [pf.metadata.row_group(g).num_rows
                                             for g in range(pf.num_row_groups)]
    if sh.kind == "arrow":
        with pa.memory_map(sh.path) as source:
            reader = pa.ipc.open_stream(source)
            return reader.schema.names, [rb.num_rows for rb in reader]
    frame = read_whole(Path(sh.path))
    return list(frame.columns), [len(frame)]


class ShardReader:
    """Row groups (parquet), record batches (arrow) or whole small files (csv/json) as blocks.

    `blocks` lists (shard, block, first row of the block in its file, rows); `read(i, columns)`
    returns a pyarrow table. Only the blocks a caller asks for are ever read."""

    def __init__(self, source):
        self.source = str(source)
        self.shards = list_shards(source)
        self.blocks: list[tuple[int, int, int, int]] = []
        self.columns: list[str] | None = None
        for si, sh in enumerate(self.shards):
            try:
                names, sizes = _layout(sh)
            except DataError:
                raise
            except Exception as err:
                raise DataError(f"{sh.path}: cannot be read as a table ({err})") from err
            self._add_shard(si, names, sizes)
        if not self.blocks:
            raise DataError(f"{self.source}: no rows")

    def _add_shard(self, si: int, names: list[str], sizes: list[int]) -> None:
        if self.columns is None:
            self.columns = names
        elif set(names) != set(self.columns):
            raise DataError(f"{self.shards[si].path}: columns {names} differ from {self.shards[0].path}'s "
                            f"{self.columns}; every shard of a pairs set needs the same columns")
        start = 0
        for g, n in enumerate(sizes):
            if n:
                self.blocks.append((si, g, start, n))
            start += n

    def __getstate__(self) -> dict:
        # Workers started by spawn get the shard list, not this process's open file.
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def read(self, block: int, columns: list[str] | None = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        si, g, _, _ = self.blocks[block]
        sh = self.shards[si]
        if sh.kind == "parquet":
            # Reuse the open file (its footer is parsed once) while reading consecutive row groups
            # of one shard; keyed by process so a forked worker opens its own.
            key = (os.getpid(), si)
            if getattr(self, "_open", (None, None))[0] != key:
                self._open = (key, pq.ParquetFile(sh.path))
            return self._open[1].read_row_group(g, columns=columns)
        if sh.kind == "arrow":
            table = arrow_stream_table(sh.path, g)
        else:
            table = pa.Table.from_pandas(read_whole(Path(sh.path)), preserve_index=False)
        return table.select(columns) if columns is not None else table

    def where(self, block: int, row_in_block: int) -> tuple[str, int, Path]:
        """(file, row in that file, base folder) of a row, for messages and relative paths."""
        si, _, start, _ = self.blocks[block]
        sh = self.shards[si]
        return sh.path, start + row_in_block, Path(sh.base)
