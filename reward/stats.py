"""Small statistics shared by validation and the comparison harness."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling the values themselves)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))  # (R, N)
    means = values[idx].mean(axis=1)  # (R,)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def pairwise_outcomes(s_pos, s_neg) -> np.ndarray:
    """Per pair: 1 if the preferred image scores higher, 0.5 on a tie, 0 otherwise."""
    s_pos, s_neg = np.asarray(s_pos), np.asarray(s_neg)
    return np.where(s_pos > s_neg, 1.0, np.where(s_pos == s_neg, 0.5, 0.0))


def pairwise_accuracy_report(s_pos, s_neg, seed: int = 0) -> dict:
    outcomes = pairwise_outcomes(s_pos, s_neg)
    lo, hi = bootstrap_ci(outcomes, seed=seed)
    return {
        "pairwise_accuracy": float(outcomes.mean()),
        "ci95": [lo, hi],
        "n_pairs": int(outcomes.size),
        "ties": int((outcomes == 0.5).sum()),
        "chance": 0.5,
    }
