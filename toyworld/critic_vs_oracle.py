"""How much of the hidden taste the critic learned, and what limits it: the learning curve over the
community's pairs, the ceiling (the same recipe on oracle-ordered pairs of the same images), and accuracy by
how far apart the oracle puts the two images of a held-out pair.

A critic that still gains from 1/2 to all of the pairs would gain from a larger community; one whose ceiling
is far above it is limited by the labels, not by the images or the backbone; accuracy near 50% in the
smallest-gap bin and high in the largest says the misordered pairs are the near ties.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from runkit.files import atomic_write_bytes

# Oracle-gap bins (upper edges, oracle-score units) of the held-out pairs. The held-out pairs start at a gap
# of 0.02 (community.oracle_pair_rows), and CFG-4 samples of one prompt rarely differ by more than 0.1: on the
# third edition's 474 held-out pairs about 60% have a gap under 0.04 and 5% one above 0.08.
GAP_EDGES = (0.03, 0.05, 0.08, float("inf"))


def subset_pairs(pairs: Path, fraction: float, seed: int, out: Path) -> Path:
    """A random `fraction` of the rows of the pairs parquet `pairs` (at least one), written to `out` with the
    image paths rewritten relative to `out`'s folder (so the source folder, an input of the stage whose hash
    keys it, stays untouched). Nested subsets: a smaller fraction's rows are among a larger one's."""
    df = pd.read_parquet(pairs)
    order = np.random.default_rng(seed).permutation(len(df))  # the same order for every fraction
    keep = np.sort(order[: max(1, round(fraction * len(df)))])
    part = df.iloc[keep].reset_index(drop=True)
    src, dst = pairs.parent.resolve(), out.parent.resolve()
    for column in ("pos_path", "neg_path"):
        part[column] = [os.path.relpath(src / p, dst) for p in part[column]]
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, lambda f: part.to_parquet(f, index=False))


def pair_gaps(truth: Sequence) -> np.ndarray:
    """The oracle's score gap (preferred minus rejected, > 0) of every held-out pair: (N,)."""
    from reward.images import decode_image
    from toyworld.oracle import oracle_score

    images = [np.asarray(decode_image(ref)) for r in truth for ref in (r.pos, r.neg)]
    prompts = [r.prompt for r in truth for _ in range(2)]
    scores = oracle_score(images, prompts).reshape(-1, 2)  # (N, 2) preferred, rejected
    return scores[:, 0] - scores[:, 1]


def accuracy_by_gap(correct: np.ndarray, gaps: np.ndarray, edges: Sequence[float] = GAP_EDGES) -> list[dict]:
    """Pairwise accuracy per oracle-gap bin: `correct` (N,) 1 / 0.5 (tie) / 0 per pair, `gaps` (N,) its gap.
    One row per bin: its range (gap_to None: no upper edge, so the row survives JSON), pair count and accuracy
    (None when empty)."""
    rows, lower = [], 0.0
    for upper in edges:
        inside = (gaps >= lower) & (gaps < upper)  # (N,)
        n = int(inside.sum())
        rows.append({"gap_from": lower, "gap_to": None if upper == float("inf") else upper, "n_pairs": n,
                     "accuracy": float(correct[inside].mean()) if n else None})
        lower = upper
    return rows


def accuracy_vs_oracle(model, truth: Sequence, gaps: np.ndarray) -> dict:
    """Pairwise accuracy of `model` on the held-out oracle pairs `truth` with its 95% bootstrap interval
    (reward.stats.pairwise_accuracy_report), and per oracle-gap bin (`by_gap`); `gaps` from pair_gaps."""
    from reward.evaluate import score_pairs
    from reward.stats import pairwise_accuracy_report, pairwise_outcomes

    s_pos, s_neg = score_pairs(model, list(truth))  # (N,) each
    if len(s_pos) != len(truth):
        raise ValueError(f"{len(truth) - len(s_pos)} held-out pair(s) could not be scored; check them with "
                         "social-refl-check-pairs")
    report = pairwise_accuracy_report(s_pos, s_neg)
    report["by_gap"] = accuracy_by_gap(pairwise_outcomes(s_pos, s_neg), gaps)
    return report
