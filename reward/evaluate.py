"""Scoring preference pairs with a critic (validation, training-time eval)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from reward.data import (
    EmptySplitError,
    PairDataset,
    PairRecord,
    PairShards,
    check_format,
    collate_pairs,
    read_tables,
)
from reward.images import decode_image
from reward.model import SocialReward, pil_to_tensor
from reward.standard import StandardReward
from reward.stats import pairwise_accuracy_report


@torch.no_grad()
def score_pairs(model: SocialReward, records: list[PairRecord] | Dataset, batch_size: int = 64,
                progress: bool = False, raw: bool = False,
                counts: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores (raw cosines with `raw`) of the preferred and the rejected image of every
    pair: two (N,) arrays. `records` is a list of PairRecords or a pairs dataset (e.g. PairShards;
    rows it skips as bad are left out, so N may be 0: two empty arrays; `counts`, when given, receives
    how many: {"bad_rows"})."""
    was_training = model.training
    model.eval()
    dataset = records if isinstance(records, Dataset) else PairDataset(records, model.image_size)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs)
    pos, neg = [], []
    n_bad = 0
    for batch in tqdm(loader, desc="scoring pairs", disable=not progress):
        n_bad += batch["n_bad"]
        if not batch["prompt"]:
            continue
        txt = model.encode_text(batch["prompt"])  # (B, D)
        img = model.encode_image(torch.cat([batch["pos"], batch["neg"]]).to(model.device))  # (2B, D)
        p, n = img.chunk(2)  # (B, D) each
        s_pos, s_neg = (p * txt).sum(-1), (n * txt).sum(-1)  # (B,) raw cosines
        pos.append((s_pos if raw else model.calibrated(s_pos)).float().cpu())
        neg.append((s_neg if raw else model.calibrated(s_neg)).float().cpu())
    model.train(was_training)
    if counts is not None:
        counts["bad_rows"] = n_bad
    if not pos:  # every pair was a bad row (on_bad_row=skip), or there were none
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return torch.cat(pos).numpy(), torch.cat(neg).numpy()


def _image_at_own_size(ref) -> torch.Tensor:
    """A pair's image (path or encoded bytes) -> (3, H, W) in [0, 1] at its own size: each standard model
    resizes, crops or pads it itself, as its upstream code does with the original image."""
    return pil_to_tensor(decode_image(ref))  # (3, H, W)


@torch.no_grad()
def score_pairs_standard(model: StandardReward, records: list[PairRecord], batch_size: int = 16,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A standard reward model's scores of the preferred and the rejected image of every pair: two (N,)
    arrays. Images of equal size are batched together; the others one by one."""
    scores = []
    for start in tqdm(range(0, len(records), batch_size), desc="scoring pairs", disable=not progress):
        chunk = records[start : start + batch_size]
        images = [_image_at_own_size(ref) for r in chunk for ref in (r.pos, r.neg)]  # 2b x (3, H, W)
        prompts = [r.prompt for r in chunk for _ in range(2)]
        by_shape: dict[tuple, list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(i)
        out = torch.empty(len(images))
        for idx in by_shape.values():
            out[idx] = model(torch.stack([images[i] for i in idx]), [prompts[i] for i in idx]).cpu()  # (n,)
        scores.append(out.view(-1, 2))  # (b, 2): preferred, rejected
    both = torch.cat(scores).double().numpy()
    return both[:, 0], both[:, 1]


def evaluate_pairs(model: SocialReward | StandardReward, records: list[PairRecord] | PairShards,
                   batch_size: int = 64, progress: bool = False) -> dict:
    # A pair the community called a tie has no right answer: it is counted, not scored.
    if isinstance(records, PairShards):
        clear = Subset(records, np.flatnonzero(records.labels != 0.5).tolist())
    else:
        clear = [r for r in records if r.label != 0.5]
    if not len(clear):
        raise ValueError("no pair with a clear preference to evaluate (all labels are ties)")
    counts = {"bad_rows": 0}
    if isinstance(model, StandardReward):
        if isinstance(records, PairShards):
            raise TypeError("standard reward models score in-memory pairs: load them with "
                            "reward.data.load_pairs")
        s_pos, s_neg = score_pairs_standard(model, clear, min(batch_size, 16), progress)
    else:
        s_pos, s_neg = score_pairs(model, clear, batch_size, progress, counts=counts)
    if not len(s_pos):
        raise EmptySplitError(f"no pair could be scored: all {len(clear)} pair(s) with a clear preference "
                              "were bad rows (skipped with on_bad_row=skip); social-refl-check-pairs lists "
                              "why", n_bad_rows=counts["bad_rows"])
    report = pairwise_accuracy_report(s_pos, s_neg)
    report["n_tied_labels"] = len(records) - len(clear)
    report["n_bad_rows"] = counts["bad_rows"]  # pairs skipped as bad when their images were decoded
    return report


def majority_baseline(source, fmt: str = "auto") -> dict:
    """Accuracy of always preferring the same position (the first or the second image as the file lists
    them), on the pairs with a clear preference: what a score that learned the order alone would reach.

    Pick-a-Pic: jpg_0 vs jpg_1; ranked lists: the earlier vs the later image of each expanded pair. A
    Social Reward file names the preferred image by its column, so no order exists: `rate` is None."""
    first = total = 0
    for df, where, _ in read_tables(source):
        spec = check_format(fmt, list(df.columns), where)
        if not spec.ordered:
            return {"rate": None, "rule": "none: the file names the preferred image by column, not by "
                                          "position"}
        for row in df[spec.cheap].to_dict("records"):
            clear = [p for p in _row_preferences(spec, row) if p != 0.5]
            total, first = total + len(clear), first + sum(p > 0.5 for p in clear)
    if total == 0:
        return {"rate": None, "rule": "none: no pair with a clear preference"}
    rule = "always the first image" if first >= total - first else "always the second image"
    return {"rate": max(first, total - first) / total, "rule": rule, "n_pairs": total}


def _row_preferences(spec, row) -> list[float]:
    """P(first listed image preferred) of each of a row's pairs; none for a row whose labels are bad (loading
    it refused or skipped it)."""
    try:
        return [p for _, _, p in spec.preferences(row)]
    except ValueError:
        return []
