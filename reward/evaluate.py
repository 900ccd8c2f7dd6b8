"""Scoring preference pairs with a critic (validation, training-time eval)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from reward.data import PairDataset, PairRecord, PairShards, collate_pairs
from reward.model import SocialReward
from reward.stats import pairwise_accuracy_report


@torch.no_grad()
def score_pairs(model: SocialReward, records: list[PairRecord] | Dataset, batch_size: int = 64,
                progress: bool = False, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores (raw cosines with `raw`) of the preferred and the rejected image of every
    pair: two (N,) arrays. `records` is a list of PairRecords or a pairs dataset (e.g. PairShards;
    rows it skips as bad are left out)."""
    was_training = model.training
    model.eval()
    dataset = records if isinstance(records, Dataset) else PairDataset(records, model.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs)
    pos, neg = [], []
    for batch in tqdm(loader, desc="scoring pairs", disable=not progress):
        if not batch["prompt"]:
            continue
        txt = model.encode_text(batch["prompt"])  # (B, D)
        img = model.encode_image(torch.cat([batch["pos"], batch["neg"]]).to(model.device))  # (2B, D)
        p, n = img.chunk(2)  # (B, D) each
        s_pos, s_neg = (p * txt).sum(-1), (n * txt).sum(-1)  # (B,) raw cosines
        pos.append((s_pos if raw else model.calibrated(s_pos)).float().cpu())
        neg.append((s_neg if raw else model.calibrated(s_neg)).float().cpu())
    model.train(was_training)
    return torch.cat(pos).numpy(), torch.cat(neg).numpy()


def evaluate_pairs(model: SocialReward, records: list[PairRecord] | PairShards, batch_size: int = 64,
                   progress: bool = False) -> dict:
    # A pair the community called a tie has no right answer: it is counted, not scored.
    if isinstance(records, PairShards):
        clear = Subset(records, np.flatnonzero(records.labels != 0.5).tolist())
    else:
        clear = [r for r in records if r.label != 0.5]
    if not len(clear):
        raise ValueError("no pair with a clear preference to evaluate (all labels are ties)")
    s_pos, s_neg = score_pairs(model, clear, batch_size, progress)
    report = pairwise_accuracy_report(s_pos, s_neg)
    report["n_tied_labels"] = len(records) - len(clear)
    return report
