"""Preference pairs from the files people have.

Formats (`fmt`):
- `social`: Social Reward parquet/CSV with `prompt, pos_path, neg_path` (relative paths resolve
  against the file's folder);
- `pickapic`: Pick-a-Pic v2 parquet with `caption, jpg_0, jpg_1, label_0, label_1` (encoded bytes;
  a tie is 0.5/0.5);
- `ranked`: ImageRewardDB / HPD v2 style, one row per prompt with `prompt`, `image_path` (a list)
  and `rank` (a list, 1 = best), expanded to every pair of differently (or equally: a tie) ranked images.

A source is a file, a directory or glob of shards (parquet; Arrow files as `datasets` writes
them), or a `datasets` `save_to_disk` folder. `load_pairs` reads a small source into memory;
`PairShards` is the streaming dataset for training: it indexes pairs from the cheap columns only
(labels, ranks, prompts), and reads one row group at a time in DataLoader workers, where images are
decoded, so the table never sits in memory. `PairShardSampler` gives each process its own row groups.

Bad input raises `DataError` naming the file, the row and the fix; with `on_bad_row="skip"` bad
rows are dropped and the count plus the first offenders are logged. A pair whose two sides are the
same image (same file or same bytes) is a bad row.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import os
import re
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from reward.model import load_image_tensor, pil_to_tensor, resize_center_crop

logger = logging.getLogger(__name__)

FORMAT_COLUMNS = {
    "social": ["prompt", "pos_path", "neg_path"],
    "pickapic": ["caption", "jpg_0", "jpg_1", "label_0", "label_1"],
    "ranked": ["prompt", "image_path", "rank"],
}
# Columns holding image bytes: never read when indexing, only when a worker decodes a row.
IMAGE_COLUMNS = {"jpg_0", "jpg_1"}
TIE_POLICIES = ("auto", "keep", "drop", "half")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".json", ".jsonl", ".arrow")
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


# ----- sources: files, shard sets, `datasets` folders -----


def read_tables(source):
    """(table, name, base folder) per shard of a small source, read whole."""
    if isinstance(source, pd.DataFrame):
        yield source.reset_index(drop=True), "<DataFrame>", Path.cwd()
        return
    for sh in list_shards(source):
        yield _read_whole(Path(sh.path)), sh.path, Path(sh.base)


def _read_whole(path: Path) -> pd.DataFrame:
    try:
        if path.suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=path.suffix == ".jsonl")
        if path.suffix == ".arrow":
            return _arrow_stream_table(str(path)).to_pandas()
    except Exception as err:
        raise DataError(f"{path}: cannot be read as a table ({err})") from err
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .csv, .json or .jsonl")


@dataclass(frozen=True)
class Shard:
    path: str
    kind: str  # parquet | csv | json | jsonl | arrow (Arrow IPC stream, as `datasets` writes it)
    base: str  # the folder relative image paths resolve against


_SPLIT_NAME = re.compile(r"^(.+?)-\d{5}-of-\d{5}")


def _shard(path: Path) -> Shard:
    kind = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "jsonl",
            ".arrow": "arrow"}.get(path.suffix)
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .csv, .json, .jsonl "
                        "or .arrow (a datasets folder)")
    return Shard(str(path), kind, str(path.parent.resolve()))


def list_shards(source) -> list[Shard]:
    """The files of a pairs source: one file, a glob (`data/train-*.parquet`), a directory of
    parquet/arrow shards (searched recursively), or a `datasets` `save_to_disk` folder."""
    text = str(source)
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).suffix in TABLE_SUFFIXES)
        if not paths:
            raise DataError(f"pairs glob {text} matches no .parquet/.csv/.jsonl/.arrow file")
        return [_shard(p) for p in paths]
    path = Path(text)
    if path.is_file():
        return [_shard(path)]
    if not path.is_dir():
        raise DataError(f"pairs file {path} does not exist")
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path} is a datasets DatasetDict folder with splits {splits}; point at one split, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file():  # Dataset.save_to_disk: the shard list is in state.json
        files = [f["filename"] for f in json.loads((path / "state.json").read_text()).get("_data_files", [])]
        if not files:
            raise DataError(f"{path}/state.json lists no data files; re-save the dataset with save_to_disk")
        return [_shard(path / f) for f in files]
    paths = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".pq", ".arrow") and p.is_file())
    if not paths:
        raise DataError(f"{path} holds no .parquet or .arrow shard; point at a pairs file, a shard folder "
                        "or a glob")
    splits = sorted({m.group(1) for m in (_SPLIT_NAME.match(p.name) for p in paths) if m})
    if len(splits) > 1:
        example = next(p for p in paths if p.name.startswith(splits[-1]))
        raise DataError(f"{path} holds shards of several splits ({', '.join(splits)}); point at one split "
                        f"with a glob, e.g. {example.parent / (splits[-1] + '-*' + example.suffix)}")
    return [_shard(p) for p in paths]


def _arrow_stream_table(path: str, batch: int | None = None):
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


class ShardReader:
    """Row groups (parquet), record batches (arrow) or whole small files (csv/json) as blocks.

    `blocks` lists (shard, block, first row of the block in its file, rows); `read(i, columns)`
    returns a pyarrow table. Only the blocks a caller asks for are ever read."""

    def __init__(self, source):
        import pyarrow.parquet as pq

        self.source = str(source)
        self.shards = list_shards(source)
        self.blocks: list[tuple[int, int, int, int]] = []
        self.columns: list[str] | None = None
        for si, sh in enumerate(self.shards):
            try:
                if sh.kind == "parquet":
                    pf = pq.ParquetFile(sh.path)
                    meta = pf.metadata
                    names = list(pf.schema_arrow.names)
                    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                elif sh.kind == "arrow":
                    names, sizes = self._arrow_layout(sh.path)
                else:
                    frame = _read_whole(Path(sh.path))
                    names, sizes = list(frame.columns), [len(frame)]
            except DataError:
                raise
            except Exception as err:
                raise DataError(f"{sh.path}: cannot be read as a table ({err})") from err
            if self.columns is None:
                self.columns = names
            elif set(names) != set(self.columns):
                raise DataError(f"{sh.path}: columns {names} differ from {self.shards[0].path}'s {self.columns}; "
                                "every shard of a pairs set needs the same columns")
            start = 0
            for g, n in enumerate(sizes):
                if n:
                    self.blocks.append((si, g, start, n))
                start += n
        if not self.blocks:
            raise DataError(f"{self.source}: no rows")

    def __getstate__(self) -> dict:
        # Workers started by spawn get the shard list, not this process's open file.
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    @staticmethod
    def _arrow_layout(path: str) -> tuple[list[str], list[int]]:
        import pyarrow as pa

        with pa.memory_map(path) as source:
            reader = pa.ipc.open_stream(source)
            return reader.schema.names, [rb.num_rows for rb in reader]

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
            table = _arrow_stream_table(sh.path, g)
        else:
            table = pa.Table.from_pandas(_read_whole(Path(sh.path)), preserve_index=False)
        return table.select(columns) if columns is not None else table

    def where(self, block: int, row_in_block: int) -> tuple[str, int, Path]:
        """(file, row in that file, base folder) of a row, for messages and relative paths."""
        si, _, start, _ = self.blocks[block]
        sh = self.shards[si]
        return sh.path, start + row_in_block, Path(sh.base)


def detect_format(df, where: str) -> str:
    columns = list(df.columns) if hasattr(df, "columns") else list(df)
    for fmt, cols in FORMAT_COLUMNS.items():
        if all(c in columns for c in cols):
            return fmt
    raise DataError(
        f"{where}: cannot tell the data format from columns {columns}. Expected one of: "
        + "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMAT_COLUMNS.items())
        + ". Rename the columns or pass fmt= explicitly."
    )


def _check_format(fmt: str, columns: list[str], where: str) -> str:
    fmt = detect_format(columns, where) if fmt == "auto" else fmt
    if fmt not in FORMAT_COLUMNS:
        raise DataError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMAT_COLUMNS)} or auto")
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} for format {fmt!r} (found {list(columns)}). "
            f"A {fmt} file needs columns {FORMAT_COLUMNS[fmt]}."
        )
    return fmt


# ----- rows -> pairs -----


def _image_bytes(ref: ImageRef) -> bytes:
    if ref is None:
        raise ValueError("image is missing (an empty cell)")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, dict) and "bytes" in ref:  # a `datasets` Image feature: {"bytes", "path"}
        return ref["bytes"] if ref["bytes"] is not None else Path(ref["path"]).read_bytes()
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"image {ref} does not exist")
    return path.read_bytes()


def _decode(ref: ImageRef) -> tuple[bytes, Image.Image]:
    data = _image_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as im:
            return data, im.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        name = ref if isinstance(ref, str) else "<bytes>"
        raise ValueError(f"image {name} is corrupt or truncated ({err})") from err


def _check_image(ref: ImageRef) -> str | None:
    """None if the image decodes, else the reason it does not."""
    try:
        _decode(ref)
    except (FileNotFoundError, ValueError) as err:
        return str(err)
    return None


def _same_image(rec: PairRecord, check_bytes: bool) -> bool:
    if isinstance(rec.pos, str) and isinstance(rec.neg, str):
        if os.path.realpath(rec.pos) == os.path.realpath(rec.neg):
            return True
        if not check_bytes or not (Path(rec.pos).is_file() and Path(rec.neg).is_file()):
            return False
    try:
        return _image_bytes(rec.pos) == _image_bytes(rec.neg)
    except FileNotFoundError:
        return False


SAME_IMAGE = "both sides of the pair are the same image (same file or same bytes); such a pair teaches nothing"


def _resolve(p, base: Path) -> str:
    if isinstance(p, dict):  # a `datasets` Image feature stays as is (bytes inside)
        return p
    p = Path(str(p))
    return str(p if p.is_absolute() else base / p)


def _records_from_row(fmt: str, row, base: Path, idx: int) -> list[PairRecord]:
    if fmt == "social":
        return [PairRecord(row["prompt"], _resolve(row["pos_path"], base), _resolve(row["neg_path"], base), row=idx)]
    if fmt == "pickapic":
        l0, l1 = float(row["label_0"]), float(row["label_1"])
        if not l0 + l1 > 0:
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


def _pair_labels(fmt: str, row) -> list[float]:
    """Labels of a row's pairs from its cheap columns alone (no images): 1.0, or 0.5 for a tie."""
    if fmt == "social":
        return [1.0]
    if fmt == "pickapic":
        l0, l1 = float(row["label_0"]), float(row["label_1"])
        return [0.5 if l0 == l1 else 1.0]
    ranks = list(row["rank"])
    return [0.5 if a == b else 1.0 for a, b in itertools.combinations(ranks, 2)]


def row_problems(fmt: str, row, base: Path, idx: int, check_images: bool) -> tuple[list[PairRecord], list[str]]:
    """A row's pairs and what is wrong with it (empty when the row is good)."""
    prompt_col = "caption" if fmt == "pickapic" else "prompt"
    prompt = row[prompt_col]
    if not isinstance(prompt, str) or not prompt.strip():
        return [], [f"empty or missing {prompt_col}"]
    try:
        records = _records_from_row(fmt, row, base, idx)
    except Exception as err:
        return [], [str(err)]
    problems: list[str] = []
    if check_images:
        for rec in records:
            for ref in (rec.pos, rec.neg):
                reason = _check_image(ref)
                if reason and reason not in problems:
                    problems.append(reason)
    if not problems and any(_same_image(rec, check_bytes=check_images) for rec in records):
        problems.append(SAME_IMAGE)
    return records, problems


def _apply_tie_policy(rec: PairRecord, tie_policy: str) -> PairRecord | None:
    if rec.label == 0.5:
        if tie_policy == "drop":
            return None
        if tie_policy == "half":
            rec.label, rec.weight = 1.0, 0.5
    return rec


def _tie_policy(tie_policy: str, loss_handles_ties: bool) -> str:
    if tie_policy not in TIE_POLICIES:
        raise DataError(f"tie_policy must be one of {TIE_POLICIES}, got {tie_policy!r}")
    if tie_policy == "auto":
        return "keep" if loss_handles_ties else "drop"
    return tie_policy


def _bad_row_policy(on_bad_row: str) -> str:
    if on_bad_row not in ("error", "skip"):
        raise DataError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    return on_bad_row


FIX = ". Fix or remove the row (scripts/check_pairs.py writes a clean copy), or set on_bad_row=skip to drop bad rows."


def load_pairs(
    source,
    fmt: str = "auto",
    tie_policy: str = "auto",
    loss_handles_ties: bool = False,
    on_bad_row: str = "error",
    check_images: bool = True,
    max_reported: int = 5,
) -> list[PairRecord]:
    """Read a small `source` (path, glob, folder or DataFrame) into validated `PairRecord`s in memory.

    For training at scale use `PairShards`, which streams. tie_policy: keep (label 0.5; for
    pairwise/pickscore), drop, half (kept as an ordinary pair at weight 0.5), auto (keep if the loss
    handles ties, else drop).
    """
    on_bad_row = _bad_row_policy(on_bad_row)
    tie_policy = _tie_policy(tie_policy, loss_handles_ties)
    records: list[PairRecord] = []
    bad: list[str] = []
    n_ties_dropped = n_rows = 0
    where = "<DataFrame>" if isinstance(source, pd.DataFrame) else str(source)
    for df, name, base in read_tables(source):
        fmt_here = _check_format(fmt, list(df.columns), name)
        rows = df.to_dict("records")
        n_rows += len(rows)
        for idx, row in enumerate(tqdm(rows, desc=f"checking {Path(name).name}", disable=len(rows) < 2000)):
            row_records, problems = row_problems(fmt_here, row, base, idx, check_images)
            if problems:
                msg = f"{name}, row {idx}: {'; '.join(problems)}"
                if on_bad_row == "error":
                    raise DataError(msg + FIX)
                bad.append(msg)
                continue
            for rec in row_records:
                if _apply_tie_policy(rec, tie_policy) is None:
                    n_ties_dropped += 1
                else:
                    records.append(rec)
    if bad:
        logger.warning("%s: skipped %d bad row(s) of %d; first: %s", where, len(bad), n_rows,
                       " | ".join(bad[:max_reported]))
    if n_ties_dropped:
        logger.info("%s: dropped %d tied pair(s) (tie_policy=drop)", where, n_ties_dropped)
    if not records:
        raise DataError(f"{where}: no valid preference pair ({n_rows} row(s), {len(bad)} bad, "
                        f"{n_ties_dropped} ties dropped). Check the file's contents.")
    return records


def prompt_in_val(prompt, val_fraction: float) -> bool:
    """Held-out prompts by a stable hash: the same prompt lands on the same side in every process
    and every run, without a global list of prompts."""
    return zlib.crc32(str(prompt).encode()) % 1_000_000 < val_fraction * 1_000_000


def _image_item(ref: ImageRef, size: int) -> tuple[bytes, torch.Tensor]:
    data, image = _decode(ref)
    return data, resize_center_crop(pil_to_tensor(image)[None], size)[0]  # (3, S, S)


# ----- streaming -----


class PairShards(Dataset):
    """The streaming pairs dataset: item i = one pair, decoded in the worker that asks for it.

    Indexing reads only the cheap columns (labels, ranks, and prompts when `split` is set), so the
    index of a million pairs is a few numpy arrays. Items read the whole row group they sit in and
    keep the last `cache_blocks` of them (per worker); `PairShardSampler` orders pairs so that a
    worker moves through row groups rather than jumping between them.

    split: None = every pair; "train" / "val" = only prompts off / on the `val_fraction` hash split.
    A bad row gives an item {"bad": message} with on_bad_row=skip (collate counts and drops it) and
    raises `DataError` with on_bad_row=error.
    """

    def __init__(self, source, image_size: int, fmt: str = "auto", tie_policy: str = "auto",
                 loss_handles_ties: bool = False, on_bad_row: str = "error", split: str | None = None,
                 val_fraction: float = 0.0, cache_blocks: int = 4):
        self.on_bad_row = _bad_row_policy(on_bad_row)
        self.tie_policy = _tie_policy(tie_policy, loss_handles_ties)
        if split not in (None, "train", "val"):
            raise DataError(f"split must be None, 'train' or 'val', got {split!r}")
        self.reader = ShardReader(source)
        self.fmt = _check_format(fmt, self.reader.columns, self.reader.source)
        self.image_size = image_size
        self.cache_blocks = max(1, cache_blocks)
        self._cache: OrderedDict = OrderedDict()
        cheap = {"social": [], "pickapic": ["label_0", "label_1"], "ranked": ["rank"]}[self.fmt]
        prompt_col = "caption" if self.fmt == "pickapic" else "prompt"
        if split is not None:
            cheap = cheap + [prompt_col]
        parts: list[np.ndarray] = []  # per row group: (n_pairs, 4) block, row, sub, label
        self.n_ties_dropped = 0
        self.n_rows = 0
        for b, (_, _, _, n) in enumerate(self.reader.blocks):
            self.n_rows += n
            block_ids, rows, subs, labels = [], [], [], []
            table = self.reader.read(b, cheap) if cheap else None
            data = table.to_pydict() if table is not None else {}
            for r in range(n):
                row = {c: data[c][r] for c in cheap}
                if split is not None and prompt_in_val(row[prompt_col], val_fraction) != (split == "val"):
                    continue
                try:
                    row_labels = _pair_labels(self.fmt, row)
                except Exception:  # unreadable labels: decoding reports the row with its reason
                    row_labels = [1.0]
                for k, lab in enumerate(row_labels):
                    if lab == 0.5 and self.tie_policy == "drop":
                        self.n_ties_dropped += 1
                        continue
                    block_ids.append(b)
                    rows.append(r)
                    subs.append(k)
                    labels.append(lab)
            parts.append(np.array([block_ids, rows, subs, labels], dtype=np.float64).reshape(4, -1).T)
        index = np.concatenate(parts) if parts else np.zeros((0, 4))  # (N, 4)
        self.block_of = index[:, 0].astype(np.int32)  # (N,)
        self.row_of = index[:, 1].astype(np.int32)  # (N,) row within the block
        self.sub_of = index[:, 2].astype(np.int32)  # (N,) pair within the row (ranked lists)
        self.labels = index[:, 3].astype(np.float32)  # (N,) 1.0, or 0.5 for a kept tie
        if not len(self.block_of):
            raise DataError(f"{self.reader.source}: no preference pair ({self.n_rows} row(s), "
                            f"{self.n_ties_dropped} ties dropped, split={split}). Check the data or "
                            "data.val_fraction.")
        if self.n_ties_dropped:
            logger.info("%s: dropped %d tied pair(s) (tie_policy=drop)", self.reader.source, self.n_ties_dropped)

    def __len__(self) -> int:
        return len(self.block_of)

    def __getstate__(self) -> dict:
        # A worker started by spawn begins with an empty cache, not a copy of this process's.
        return {**self.__dict__, "_cache": OrderedDict()}

    def block_ranges(self) -> list[tuple[int, int]]:
        """(start, stop) item ranges that share a row group: items are stored block by block."""
        bounds = np.flatnonzero(np.diff(self.block_of)) + 1
        starts = np.concatenate([[0], bounds])
        stops = np.concatenate([bounds, [len(self.block_of)]])
        return list(zip(starts.tolist(), stops.tolist()))

    def _block(self, b: int) -> dict:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        data = self.reader.read(b).to_pydict()
        self._cache[b] = data
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return data

    def row(self, i: int) -> tuple[dict, str, int, Path]:
        b, r = int(self.block_of[i]), int(self.row_of[i])
        data = self._block(b)
        path, file_row, base = self.reader.where(b, r)
        return {c: v[r] for c, v in data.items()}, path, file_row, base

    def __getitem__(self, i: int) -> dict:
        row, path, file_row, base = self.row(i)
        records, problems = row_problems(self.fmt, row, base, file_row, check_images=False)
        item = None
        if not problems:
            rec = records[int(self.sub_of[i])]
            try:
                pos_bytes, pos = _image_item(rec.pos, self.image_size)
                neg_bytes, neg = _image_item(rec.neg, self.image_size)
                if pos_bytes == neg_bytes:
                    problems.append(SAME_IMAGE)
            except (FileNotFoundError, ValueError) as err:
                problems.append(str(err))
            if not problems:
                rec = _apply_tie_policy(rec, "half" if self.tie_policy == "half" else "keep")
                item = {"prompt": rec.prompt, "pos": pos, "neg": neg,
                        "label": torch.tensor(rec.label, dtype=torch.float32),
                        "weight": torch.tensor(rec.weight, dtype=torch.float32)}
        if problems:
            msg = f"{path}, row {file_row}: {'; '.join(problems)}"
            if self.on_bad_row == "error":
                raise DataError(msg + FIX)
            return {"bad": msg}
        return item


class PairShardSampler(Sampler[list[int]]):
    """Batches of item indices, each process's share made of whole row groups of its own.

    Row groups are shuffled by (seed, epoch), dealt to the lightest process so far (so shares are
    disjoint and balanced by pair count), and shuffled within windows of `shuffle_blocks` row groups.
    Every share is cut or wrapped to the same length, as DDP needs. Batches come interleaved (process
    0's first batch, process 1's first, ...), which is how `accelerator.prepare` deals a batch sampler
    out to processes: each process then loads only its own batches, so it reads only its row groups.
    The training loop sets `epoch`; no `set_epoch`, because accelerate would call it with its own count.
    """

    def __init__(self, dataset: PairShards, batch_size: int, seed: int = 0, world: int = 1,
                 shuffle: bool = True, shuffle_blocks: int = 4):
        self.pairs_per_batch, self.seed, self.world = batch_size, seed, world
        # None tells accelerate's BatchSamplerShard to pass our batches through as they are: with a
        # number it would top up each process's last short batch from other processes' items.
        self.batch_size = None
        self.shuffle, self.shuffle_blocks = shuffle, max(1, shuffle_blocks)
        self.epoch = 0
        units = dataset.block_ranges()
        if len(units) < world:  # fewer row groups than processes: split row groups into slices
            units = [(a + (b - a) * k // world, a + (b - a) * (k + 1) // world) for a, b in units
                     for k in range(world)]
            units = [u for u in units if u[1] > u[0]]
        if len(units) < world:
            raise DataError(f"{dataset.reader.source}: {len(dataset)} pair(s) cannot feed {world} processes")
        self.units = units

    def shares(self) -> list[np.ndarray]:
        """Each process's items for the current epoch, in order, `per_process()` of them."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        loads = np.zeros(self.world, dtype=np.int64)
        owned: list[list[tuple[int, int]]] = [[] for _ in range(self.world)]
        for u in order.tolist():
            p = int(np.argmin(loads))
            a, b = self.units[u]
            loads[p] += b - a
            owned[p].append((a, b))
        target = self.per_process()
        out = []
        for mine in owned:
            parts = []
            for w in range(0, len(mine), self.shuffle_blocks):
                window = np.concatenate([np.arange(a, b) for a, b in mine[w : w + self.shuffle_blocks]])
                if self.shuffle:
                    rng.shuffle(window)
                parts.append(window)
            share = np.concatenate(parts)  # (n_p,)
            # A longer share loses its last few items this epoch (others next epoch), a shorter one
            # repeats its first few.
            out.append(np.resize(share, target))  # (target,)
        return out

    def per_process(self) -> int:
        return math.ceil(sum(b - a for a, b in self.units) / self.world)

    def batches_per_process(self) -> int:
        return math.ceil(self.per_process() / self.pairs_per_batch)

    def __iter__(self):
        shares = self.shares()
        for k in range(self.batches_per_process()):
            for share in shares:
                yield share[k * self.pairs_per_batch : (k + 1) * self.pairs_per_batch].tolist()

    def __len__(self) -> int:
        return self.batches_per_process() * self.world


def _open(ref: ImageRef, size: int, rec: PairRecord) -> torch.Tensor:
    try:
        image = Image.open(io.BytesIO(ref)) if isinstance(ref, (bytes, bytearray)) else ref
        return load_image_tensor(image, size)
    except (OSError, ValueError) as err:
        raise DataError(f"row {rec.row}: {err}") from err


class PairDataset(Dataset):
    """In-memory records (from `load_pairs`). Items: prompt, pos/neg image tensors (3, S, S) in
    [0, 1], label, weight."""

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


def split_by_prompt(records: list[PairRecord], val_fraction: float):
    """Held-out prompts, not held-out pairs: a prompt's pairs all land on one side, the side
    `prompt_in_val` gives it (the same split training makes on a streamed source)."""
    val = [prompt_in_val(r.prompt, val_fraction) for r in records]
    return [r for r, v in zip(records, val) if not v], [r for r, v in zip(records, val) if v]


# ----- the checking pass (scripts/check_pairs.py) -----


class _BlockCheck(Dataset):
    """Item b = the bad rows of row group b as [(row in file, reason)], every image decoded (in workers)."""

    def __init__(self, reader: ShardReader, fmt: str):
        self.reader, self.fmt = reader, fmt

    def __len__(self) -> int:
        return len(self.reader.blocks)

    def __getitem__(self, b: int) -> list[tuple[int, str]]:
        data = self.reader.read(b).to_pydict()
        n = self.reader.blocks[b][3]
        bad = []
        for r in range(n):
            path, file_row, base = self.reader.where(b, r)
            _, problems = row_problems(self.fmt, {c: v[r] for c, v in data.items()}, base, file_row, True)
            if problems:
                bad.append((file_row, "; ".join(problems)))
        return bad


def _absolute_paths(table, fmt: str, base: Path):
    """Relative image paths made absolute, so the clean file works wherever it is written."""
    import pyarrow as pa

    cols = {"social": ["pos_path", "neg_path"], "ranked": ["image_path"]}.get(fmt, [])
    for name in cols:
        values = table.column(name).to_pylist()
        if name == "image_path":
            values = [[_resolve(p, base) for p in v] if v is not None else v for v in values]
        else:
            values = [_resolve(v, base) if v is not None else v for v in values]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    return table


def check_pairs(source, out: str | os.PathLike, report: str | os.PathLike | None = None, fmt: str = "auto",
                num_workers: int = 0, row_group_size: int = 256, max_listed: int = 10_000) -> dict:
    """Decode every image of every row once; write the good rows to `out` (parquet, written to a
    temp file then renamed; relative image paths made absolute) and a JSON report of the bad rows
    (file, row, reason) to `report`. Reads one row group at a time; workers decode in parallel."""
    import pyarrow.parquet as pq

    from runkit.files import atomic_write_bytes

    out = Path(out)
    if out.suffix not in (".parquet", ".pq"):
        raise DataError(f"--out {out}: the clean pairs file is written as parquet; name it *.parquet")
    reader = ShardReader(source)
    fmt = _check_format(fmt, reader.columns, reader.source)
    loader = torch.utils.data.DataLoader(_BlockCheck(reader, fmt), batch_size=None, num_workers=num_workers)
    problems: list[dict] = []
    n_rows = n_bad = 0

    def write(f):
        nonlocal n_rows, n_bad
        writer = None
        for b, bad in enumerate(tqdm(loader, desc=f"checking {reader.source}", total=len(reader.blocks))):
            si, _, start, n = reader.blocks[b]
            n_rows += n
            n_bad += len(bad)
            for file_row, reason in bad:
                if len(problems) < max_listed:
                    problems.append({"file": reader.shards[si].path, "row": file_row, "reason": reason})
            keep = np.ones(n, dtype=bool)
            keep[[file_row - start for file_row, _ in bad]] = False
            table = _absolute_paths(reader.read(b).filter(keep), fmt, Path(reader.shards[si].base))
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema)
            writer.write_table(table.cast(writer.schema), row_group_size=row_group_size)
        if writer is not None:
            writer.close()

    atomic_write_bytes(out, write)
    result = {"source": reader.source, "format": fmt, "shards": len(reader.shards), "rows": n_rows,
              "good_rows": n_rows - n_bad, "bad_rows": n_bad, "listed": len(problems), "clean": str(out),
              "problems": problems}
    if report is not None:
        text = json.dumps(result, indent=2).encode()
        atomic_write_bytes(report, lambda f: f.write(text))
    return result
