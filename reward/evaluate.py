"""Scoring preference pairs with a critic (validation, training-time eval)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from reward.data import PairDataset, PairRecord, PairShards, collate_pairs
from reward.model import SocialReward
from reward.standard import StandardReward
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


def _image_at_own_size(ref) -> torch.Tensor:
    """A pair's image (path or encoded bytes) -> (3, H, W) in [0, 1] at its own size: each standard model
    resizes, crops or pads it itself, as its upstream code does with the original image."""
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    except OSError as err:
        raise OSError(f"image {ref if isinstance(ref, str) else '<bytes>'} cannot be decoded ({err})") from err
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)


@torch.no_grad()
def score_pairs_standard(model: StandardReward, records: list[PairRecord], batch_size: int = 16,
                         progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A standard reward model's scores of the preferred and the rejected image of every pair: two (N,) arrays.
    Images of equal size are batched together; the others one by one."""
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


def evaluate_pairs(model: SocialReward | StandardReward, records: list[PairRecord] | PairShards, batch_size: int = 64,
                   progress: bool = False) -> dict:
    # A pair the community called a tie has no right answer: it is counted, not scored.
    if isinstance(records, PairShards):
        clear = Subset(records, np.flatnonzero(records.labels != 0.5).tolist())
    else:
        clear = [r for r in records if r.label != 0.5]
    if not len(clear):
        raise ValueError("no pair with a clear preference to evaluate (all labels are ties)")
    if isinstance(model, StandardReward):
        if isinstance(records, PairShards):
            raise TypeError("standard reward models score in-memory pairs: load them with reward.data.load_pairs")
        s_pos, s_neg = score_pairs_standard(model, clear, min(batch_size, 16), progress)
    else:
        s_pos, s_neg = score_pairs(model, clear, batch_size, progress)
    report = pairwise_accuracy_report(s_pos, s_neg)
    report["n_tied_labels"] = len(records) - len(clear)
    return report


def majority_baseline(source, fmt: str = "auto") -> dict:
    """Accuracy of always preferring the same position (the first or the second image as the file lists
    them), on the pairs with a clear preference: what a score that learned the order alone would reach.

    Pick-a-Pic: jpg_0 vs jpg_1; ranked lists: the earlier vs the later image of each expanded pair. A
    Social Reward file names the preferred image by its column, so no order exists: `rate` is None."""
    from reward.data import detect_format, read_tables

    first = total = 0
    for df, where, _ in read_tables(source):
        kind = detect_format(df, where) if fmt == "auto" else fmt
        if kind == "pickapic":
            l0, l1 = df["label_0"].astype(float).to_numpy(), df["label_1"].astype(float).to_numpy()
            clear = l0 != l1
            first, total = first + int((l0 > l1)[clear].sum()), total + int(clear.sum())
        elif kind == "ranked":
            for ranks in df["rank"]:
                ranks = list(ranks)
                for i in range(len(ranks)):
                    for j in range(i + 1, len(ranks)):
                        if ranks[i] != ranks[j]:
                            total += 1
                            first += int(ranks[i] < ranks[j])
        else:
            return {"rate": None, "rule": "none: the file names the preferred image by column, not by position"}
    if total == 0:
        return {"rate": None, "rule": "none: no pair with a clear preference"}
    rule = "always the first image" if first >= total - first else "always the second image"
    return {"rate": max(first, total - first) / total, "rule": rule, "n_pairs": total}
