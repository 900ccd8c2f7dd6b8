"""Streaming pairs for training: `PairShards` indexes a large source from its cheap columns, checked, and
decodes a pair's images only when a DataLoader worker asks for it; `PairShardSampler` gives each process
its own row groups."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

from reward.data.errors import FIX, BadRows, DataError, EmptySplitError, check_on_bad_row
from reward.data.formats import cheap_problems, check_format
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
from reward.data.sources import ShardReader

logger = logging.getLogger(__name__)


class PairShards(Dataset):
    """The streaming pairs dataset: item i = one pair, decoded in the worker that asks for it.

    Indexing reads only the cheap columns (prompts, labels, ranks, image paths) and checks them: labels
    that give no preference, empty prompts and missing image files stop here with `DataError` (naming the
    file, the row and the fix), or with on_bad_row=skip are dropped and counted (`n_bad_rows`, logged),
    before any training. The index of a million pairs is a few numpy arrays. Items read the whole row
    group they sit in and keep the last `cache_blocks` of them (per worker); `PairShardSampler` orders
    pairs so that a worker moves through row groups rather than jumping between them.

    split: None = every pair; "train" / "val" = only prompts off / on the `val_fraction` hash split.
    A pair that repeats an earlier one (`reward.data.pairs.row_pair_keys`: same prompt, images and label) is
    counted (`n_duplicates`, logged) and, with duplicate_pairs=drop, left out of the index.
    A row whose images turn out bad when decoded gives an item {"bad": message} with on_bad_row=skip
    (collate counts and drops it) and raises `DataError` with on_bad_row=error. No pair left at all
    raises `EmptySplitError`.
    """

    def __init__(self, source, image_size: int, fmt: str = "auto", tie_policy: str = "auto",
                 loss_handles_ties: bool = False, on_bad_row: str = "error", split: str | None = None,
                 val_fraction: float = 0.0, cache_blocks: int = 4, duplicate_pairs: str = "drop"):
        self.on_bad_row = check_on_bad_row(on_bad_row)
        self.duplicate_pairs = check_duplicate_policy(duplicate_pairs)
        self.tie_policy = resolve_tie_policy(tie_policy, loss_handles_ties)
        if split not in (None, "train", "val"):
            raise DataError(f"split must be None, 'train' or 'val', got {split!r}")
        self.reader = ShardReader(source)
        self.format = check_format(fmt, self.reader.columns, self.reader.source)
        self.fmt = self.format.name
        self.image_size = image_size
        self.cache_blocks = max(1, cache_blocks)
        self._cache: OrderedDict = OrderedDict()
        self._build_index(split, val_fraction)

    def _build_index(self, split: str | None, val_fraction: float) -> None:
        bad = BadRows(self.on_bad_row)
        self.n_ties_dropped = self.n_rows = 0
        parts = [self._index_block(b, split, val_fraction, bad) for b in range(len(self.reader.blocks))]
        index = np.concatenate([entries for entries, _ in parts])  # (N, 4): block, row, pair in row, label
        index = self._drop_duplicates(index, np.concatenate([keys for _, keys in parts]))
        self.block_of = index[:, 0].astype(np.int32)  # (N,)
        self.row_of = index[:, 1].astype(np.int32)  # (N,) row within the block
        self.sub_of = index[:, 2].astype(np.int32)  # (N,) pair within the row (ranked lists)
        self.labels = index[:, 3].astype(np.float32)  # (N,) 1.0, or 0.5 for a kept tie
        self.n_bad_rows = bad.count
        bad.log(self.reader.source, self.n_rows)
        if not len(self.block_of):
            raise EmptySplitError(f"{self.reader.source}: no preference pair ({self.n_rows} row(s), "
                                  f"{bad.count} bad, {self.n_ties_dropped} ties dropped, split={split}). "
                                  "Check the data or data.val_fraction.", n_bad_rows=bad.count)
        if self.n_ties_dropped:
            logger.info("%s: dropped %d tied pair(s) (tie_policy=drop)", self.reader.source,
                        self.n_ties_dropped)

    def _index_columns(self) -> list[str]:
        """What indexing reads: the cheap columns, and what tells images apart for `row_pair_keys` (the
        format's id columns where the table has them, else the images themselves when they are bytes)."""
        spec, columns = self.format, self.format.cheap
        ids = [c for c in spec.image_ids if c in self.reader.columns]
        if ids and len(ids) == len(spec.image_ids):
            return [*columns, *ids]
        return columns if spec.holds_paths else [*columns, *spec.images]

    def _index_block(self, b: int, split: str | None, val_fraction: float,
                     bad: BadRows) -> tuple[np.ndarray, np.ndarray]:
        """(pairs, 4) index entries of row group b, from its cheap columns, and their (pairs,) keys; bad rows
        go to `bad`."""
        spec, n = self.format, self.reader.blocks[b][3]
        columns = self._index_columns()
        data = self.reader.read(b, columns).to_pydict()
        self.n_rows += n
        entries, keys = [], []
        for r in range(n):
            row = {c: data[c][r] for c in columns}
            if split is not None and prompt_in_val(row[spec.prompt], val_fraction) != (split == "val"):
                continue
            path, file_row, base = self.reader.where(b, r)
            problems = cheap_problems(spec, row, base)
            if problems:
                bad.add(f"{path}, row {file_row}: {'; '.join(problems)}")
                continue
            for entry, key in self._row_entries(b, r, row, base):
                entries.append(entry)
                keys.append(key)
        return np.array(entries, dtype=np.float64).reshape(-1, 4), np.array(keys, dtype=np.uint64)

    def _row_entries(self, b: int, r: int, row: dict, base: Path) -> list[tuple[tuple, int]]:
        """The index entries (block, row, pair in row, label) of one checked row, one per preference, each
        with its key (`row_pair_keys`)."""
        entries = []
        keys = row_pair_keys(self.format, row, base)
        for k, ((_, _, p), key) in enumerate(zip(self.format.preferences(row), keys)):
            if p == 0.5 and self.tie_policy == "drop":
                self.n_ties_dropped += 1
                continue
            entries.append(((b, r, k, 0.5 if p == 0.5 else 1.0), key))
        return entries

    def _drop_duplicates(self, index: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Count the entries that repeat an earlier one (`n_duplicates`), log the first few, and with
        duplicate_pairs=drop leave them out."""
        repeats, originals = find_duplicates(keys)
        self.n_duplicates = len(repeats)

        def where(i: int) -> tuple[str, int]:
            path, file_row, _ = self.reader.where(int(index[i, 0]), int(index[i, 1]))
            return path, file_row

        examples = [(where(i), where(j)) for i, j in zip(repeats[:3], originals[:3])]
        report_duplicates(self.reader.source, len(repeats), len(index), examples, self.duplicate_pairs,
                          self._entry_noun)
        if self.duplicate_pairs == "keep" or not len(repeats):
            return index
        return np.delete(index, repeats, axis=0)

    def __len__(self) -> int:
        return len(self.block_of)

    def __getstate__(self) -> dict:
        # A worker started by spawn begins with an empty cache, not a copy of this process's.
        return {**self.__dict__, "_cache": OrderedDict()}

    _entry_noun = "pair"  # what an entry is, in messages

    def prompts(self) -> list[str]:
        """The distinct prompts of the indexed items, sorted; read from the prompt column alone, a row group
        at a time (no image is read)."""
        found: set[str] = set()
        column = self.format.prompt
        for start, stop in self.block_ranges():
            values = self.reader.read(int(self.block_of[start]), [column]).to_pydict()[column]
            found.update(values[r] for r in self.row_of[start:stop].tolist())
        return sorted(found)

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
        try:
            records, problems = row_problems(self.format, row, base, file_row, check_images=False)
            if not problems:
                rec = apply_tie_policy(records[int(self.sub_of[i])],
                                       "half" if self.tie_policy == "half" else "keep")
                return pair_item(rec, self.image_size)
        except (FileNotFoundError, ValueError) as err:
            problems = [str(err)]
        msg = f"{path}, row {file_row}: {'; '.join(problems)}"
        if self.on_bad_row == "error":
            raise DataError(msg + FIX)
        return {"bad": msg}


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

    def _deal(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        """Row-group ranges per process: shuffled, each to the process with the fewest pairs so far."""
        order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        loads = np.zeros(self.world, dtype=np.int64)
        owned: list[list[tuple[int, int]]] = [[] for _ in range(self.world)]
        for u in order.tolist():
            p = int(np.argmin(loads))
            a, b = self.units[u]
            loads[p] += b - a
            owned[p].append((a, b))
        return owned

    def shares(self) -> list[np.ndarray]:
        """Each process's items for the current epoch, in order, `per_process()` of them."""
        rng = np.random.default_rng([self.seed, self.epoch])
        target = self.per_process()
        out = []
        for mine in self._deal(rng):
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
