"""The numbers of a comparison run (results.json), from per-image scores: no model, no files.

`compute_statistics` assembles four parts, one function each:

- `arm_rows`           every arm (random sample, best-of-n for n = 1, 2, 4, ..., N): its cost and its
                       mean score per evaluator with a 95% bootstrap interval over prompts;
- `selection_inflation` how far best-of-N raised each evaluator, in units of the within-prompt spread:
                       the selector's own gain is inflated by selection, the other evaluators' are honest;
- `refl_win_rates`     per evaluator, the share of comparisons ReFL wins against base (ties half);
- diversity            mean pairwise 1 - cos of the selector's image embeddings, per prompt.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evaluation.arms import arm_name
from evaluation.config import CompareConfig
from reward.stats import bootstrap_ci


def best_of_n_indices(selector_scores: np.ndarray, n: int) -> np.ndarray:
    """(P, N) selector scores -> (P,) index of the best among the FIRST n samples (first one on ties)."""
    if not 1 <= n <= selector_scores.shape[1]:
        raise ValueError(f"n must be in [1, {selector_scores.shape[1]}], got {n}")
    return np.argmax(selector_scores[:, :n], axis=1)


def n_grid(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, with n_max itself appended when it is not a power of two."""
    grid = [2**k for k in range(int(math.log2(n_max)) + 1)]
    return grid if grid[-1] == n_max else [*grid, n_max]


def mean_ci(values, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over prompts and its 95% percentile-bootstrap interval (resampling prompts)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": float(values.mean()), "ci95": [lo, hi], "n": int(values.size)}


def win_shares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt, the share of comparisons a wins (ties count half). a, b: (P,) or (P, k), broadcast."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    outcome = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    return outcome.reshape(outcome.shape[0], -1).mean(axis=1)  # (P,)


def pairwise_diversity(embeddings: torch.Tensor) -> float:
    """Mean over pairs i != j of 1 - cos(e_i, e_j) for normalised embeddings (n, D)."""
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    e = embeddings.double()
    sim = e @ e.T  # (n, n)
    return float((1.0 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item())


def arm_row(cfg: CompareConfig, model: str, n: int, per_prompt: dict[str, np.ndarray],
            seconds: dict[str, float], chosen: np.ndarray | None = None) -> dict:
    """One arm: n samples per prompt of `model`, `per_prompt[spec]` (P,) its score per prompt, `chosen` (P,)
    the selector's pick when the arm is a best-of-n."""
    # Best-of-n with n > 1 also pays for scoring its n samples with the selector.
    selection = chosen is not None and n > 1
    row = {
        "model": model, "n": n,
        "unet_evals_per_prompt": n * cfg.num_inference_steps * cfg.cfg_factor,
        "seconds_per_prompt": n * seconds[model] + (n * seconds["selector"] if selection else 0.0),
        "scores": {s: mean_ci(v, n_resamples=cfg.bootstrap_resamples) for s, v in per_prompt.items()},
        "per_prompt": {s: v.tolist() for s, v in per_prompt.items()},
    }
    if chosen is not None:
        row["chosen_index"] = chosen.tolist()
    return row


def arm_rows(cfg: CompareConfig, scores: dict[str, dict[str, np.ndarray]],
             seconds: dict[str, float]) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """Every arm ({model}_random, {model}_best_of_{n}) in report order, and the n grid per model."""
    sel, specs = cfg.selector_spec, cfg.evaluator_specs()
    arms: dict[str, dict] = {}
    curves: dict[str, list[int]] = {}
    for model in ["base", "refl"] if "refl" in scores else ["base"]:
        s_model = scores[model]
        arms[arm_name(model)] = arm_row(cfg, model, 1, {s: s_model[s].mean(axis=1) for s in specs}, seconds)
        if model == "refl" and not cfg.tuned_best_of:
            continue
        curves[model] = n_grid(s_model[sel].shape[1])
        for n in curves[model]:
            idx = best_of_n_indices(s_model[sel], n)  # (P,)
            rows = np.arange(len(idx))
            arms[arm_name(model, n)] = arm_row(cfg, model, n, {s: s_model[s][rows, idx] for s in specs},
                                                   seconds, chosen=idx)
    return arms, curves


def selection_inflation(cfg: CompareConfig, scores: dict[str, dict[str, np.ndarray]], arms: dict) -> dict:
    """Per evaluator: best-of-N's gain over one random sample, raw and in within-prompt standard deviations
    (comparable across evaluators), ReFL's gain likewise, and how much more the selector gained."""
    sel, specs, n_base = cfg.selector_spec, cfg.evaluator_specs(), cfg.n_samples
    base_random, best_base = arms[arm_name("base")]["scores"], arms[arm_name("base", n_base)]["scores"]
    inflation = {}
    for s in specs:
        # Within-prompt spread: what selection among one prompt's samples acts on.
        std = float(np.sqrt(np.mean(scores["base"][s].var(axis=1, ddof=1)))) if n_base > 1 else float("nan")
        gain = best_base[s]["mean"] - base_random[s]["mean"]
        inflation[s] = {"gain": gain, "std_within_prompt": std,
                        "standardised_gain": gain / std if std > 0 else float("nan")}
        if "refl" in scores:
            g = arms[arm_name("refl")]["scores"][s]["mean"] - base_random[s]["mean"]
            inflation[s]["refl_gain"] = g
            inflation[s]["refl_standardised_gain"] = g / std if std > 0 else float("nan")
    sel_gain = inflation[sel]["standardised_gain"]
    for s in specs:
        inflation[s]["selector_minus_evaluator"] = sel_gain - inflation[s]["standardised_gain"]
    return inflation


def refl_win_rates(cfg: CompareConfig, scores: dict[str, dict[str, np.ndarray]], arms: dict) -> dict:
    """Per evaluator, ReFL (one sample, and best-of-M when tuned_best_of) against base (one sample and
    best-of-N): per-prompt win shares, mean and 95% interval. Empty without a ReFL arm."""
    if "refl" not in scores:
        return {}
    sel, best_base = cfg.selector_spec, arm_name("base", cfg.n_samples)
    m = scores["refl"][sel].shape[1]
    refl_best = arm_name("refl", m) if cfg.tuned_best_of else None
    base_random, refl_random = arm_name("base"), arm_name("refl")
    win_rates = {}
    for s in cfg.evaluator_specs():
        base_all, refl_all = scores["base"][s], scores["refl"][s]  # (P, N), (P, M)
        best_b = np.asarray(arms[best_base]["per_prompt"][s])[:, None]  # (P, 1)
        pairs = {
            # same seeds: refl sample i against base sample i
            f"{refl_random}_vs_{base_random}": win_shares(refl_all, base_all[:, :m]),
            f"{refl_random}_vs_{best_base}": win_shares(refl_all, best_b),
        }
        if refl_best:
            best_r = np.asarray(arms[refl_best]["per_prompt"][s])[:, None]  # (P, 1)
            pairs[f"{refl_best}_vs_{base_random}"] = win_shares(best_r, base_all)
            pairs[f"{refl_best}_vs_{best_base}"] = win_shares(best_r, best_b)
        win_rates[s] = {k: mean_ci(v, n_resamples=cfg.bootstrap_resamples) for k, v in pairs.items()}
    return win_rates


def compute_statistics(cfg: CompareConfig, prompts: list[str], scores: dict[str, dict[str, np.ndarray]],
                       diversity: dict[str, np.ndarray], seconds: dict[str, float]) -> dict:
    """Every number of results.json from per-image scores.

    scores[arm][spec]: (P, n_arm) per-image scores; diversity[arm]: (P,); seconds: per-image sampling
    seconds per arm and selector seconds per image ("selector").
    """
    arms, curves = arm_rows(cfg, scores, seconds)
    return {
        "prompts": prompts,
        "selector": cfg.selector_spec,
        "evaluators": cfg.evaluator_specs(),
        "n_samples": cfg.n_samples,
        "n_tuned_samples": cfg.n_refl if "refl" in scores else 0,
        "n_grid": curves,
        "unet_evals_per_image": cfg.num_inference_steps * cfg.cfg_factor,
        "seconds_per_image": seconds,
        "arms": arms,
        "win_rates": refl_win_rates(cfg, scores, arms),
        "inflation": selection_inflation(cfg, scores, arms),
        # Prompts whose diversity is undefined (fewer than two samples) are left out of the mean.
        "diversity": {m: mean_ci(d[~np.isnan(d)],
                                 n_resamples=cfg.bootstrap_resamples) | {"per_prompt": d.tolist()}
                      for m, d in diversity.items()},
    }
