"""The feedback as a stream of micro-batches that a run and its resumption see identically.

dpo reads preference pairs with the critic trainer's reader (`reward.data.PairShards`: every pair format,
streaming, the bad-row policy); kto reads liked / not-liked images (`reward.data.LabelShards`). Both are
dealt out by `PairShardSampler` (each process its own row groups, reshuffled every epoch by the seed).
Micro-batch m of a process (m = update x gradient_accumulation + micro) is batch m mod n of epoch
m div n of its share (n batches per epoch), whatever happened before: a resumed run reads on from there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from refl.prompts import seed_for
from reward.data import LabelShards, PairShards, PairShardSampler, collate_labelled, collate_pairs


class FeedbackStream:
    """The micro-batches of one process: `batches(start)` yields (m, batch) from micro-batch `start` on,
    loading with `num_workers` DataLoader workers, one epoch's loader at a time.

    Built before the diffusion model loads (its index reads and checks every file, so bad feedback is
    refused in seconds, not after minutes of loading), it learns the model's image size from
    `set_image_size` before the first batch."""

    def __init__(self, method: str, data, seed: int, batch_size: int, rank: int, world: int,
                 image_size: int = 0):
        common = dict(fmt=data.format, on_bad_row=data.on_bad_row, cache_blocks=data.shuffle_row_groups + 1,
                      duplicate_pairs=data.duplicate_pairs)
        if method == "dpo":
            # A kept tie (label 0.5) has a loss of its own (preference/objectives.py), so ties stay as asked.
            self.dataset = PairShards(data.train, image_size, tie_policy=data.tie_policy,
                                      loss_handles_ties=True, **common)
            self.collate = collate_pairs
        else:
            self.dataset = LabelShards(data.train, image_size, **common)
            self.collate = collate_labelled
        self.sampler = PairShardSampler(self.dataset, batch_size, seed=seed, world=world,
                                        shuffle_blocks=data.shuffle_row_groups)
        self.batch_size, self.rank, self.num_workers, self.seed = batch_size, rank, data.num_workers, seed

    def set_image_size(self, image_size: int) -> None:
        """The side (pixels) every image is resized to: the diffusion model's."""
        self.dataset.image_size = image_size

    @property
    def n_bad_rows(self) -> int:
        """Rows the index dropped before training (on_bad_row=skip)."""
        return self.dataset.n_bad_rows

    @property
    def n_duplicates(self) -> int:
        """Pairs (dpo) or labelled images (kto) repeating an earlier one (dropped: duplicate_pairs=drop)."""
        return self.dataset.n_duplicates

    def batches(self, start: int) -> Iterator[tuple[int, dict]]:
        if not self.dataset.image_size:
            raise RuntimeError("FeedbackStream.set_image_size was not called: the images have no size to "
                               "be resized to")
        per_epoch = self.sampler.batches_per_process()
        m = start
        while True:
            epoch, first = divmod(m, per_epoch)
            self.sampler.epoch = epoch
            share = self.sampler.shares()[self.rank]  # (per_process,) this process's items this epoch
            order = [share[k * self.batch_size : (k + 1) * self.batch_size].tolist()
                     for k in range(first, per_epoch)]
            # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, and
            # a resumed run, opening its loader at another moment than the run did, would shift that RNG.
            own = torch.Generator().manual_seed(seed_for(self.seed, epoch, self.rank))
            loader = DataLoader(self.dataset, batch_sampler=order, collate_fn=self.collate,
                                num_workers=self.num_workers, generator=own)
            for batch in loader:
                yield m, batch
                m += 1
