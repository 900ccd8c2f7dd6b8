"""The numbers of a comparison run (results.json), from per-image scores: no model, no files.

`compute_statistics` assembles these parts, one function each:

- `arm_rows`           every arm (random sample, best-of-n for n = 1, 2, 4, ..., N): its cost and its
                       mean score per evaluator with a 95% bootstrap interval over prompts;
- `selection_inflation` how far best-of-N (and each tuned model) raised each evaluator, in units of the
                       within-prompt spread: the selector's own gain is inflated by selection, the other
                       evaluators' are honest;
- `win_rates`          per evaluator, the share of comparisons each tuned model wins against base and
                       against each other tuned model, and best-of-N against one base sample (ties half);
- `change_from_base`   per evaluator, what each headline arm changed from base's one sample, paired per
                       prompt;
- diversity            mean pairwise 1 - cos of the selector's image embeddings, per prompt.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evaluation.arms import BASE, REFL, arm_name, comparison_name
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
    """Every arm ({model}_random, {model}_best_of_{n}) in report order (base, then each tuned model), and the
    n grid per model."""
    sel, specs = cfg.selector_spec, cfg.evaluator_specs()
    arms: dict[str, dict] = {}
    curves: dict[str, list[int]] = {}
    for model, s_model in scores.items():
        arms[arm_name(model)] = arm_row(cfg, model, 1, {s: s_model[s].mean(axis=1) for s in specs}, seconds)
        if model != BASE and not cfg.tuned_best_of:
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
    (comparable across evaluators), each tuned model's gain likewise ("tuned": model -> gain and
    standardised gain; ReFL's also as refl_gain and refl_standardised_gain, as results have always had
    them), and how much more the selector gained."""
    sel, specs, n_base = cfg.selector_spec, cfg.evaluator_specs(), cfg.n_samples
    base_random, best_base = arms[arm_name(BASE)]["scores"], arms[arm_name(BASE, n_base)]["scores"]
    inflation = {}
    for s in specs:
        # Within-prompt spread: what selection among one prompt's samples acts on.
        std = float(np.sqrt(np.mean(scores[BASE][s].var(axis=1, ddof=1)))) if n_base > 1 else float("nan")
        gain = best_base[s]["mean"] - base_random[s]["mean"]
        inflation[s] = {"gain": gain, "std_within_prompt": std,
                        "standardised_gain": gain / std if std > 0 else float("nan")}
        tuned = {}
        for model in scores:
            if model == BASE:
                continue
            g = arms[arm_name(model)]["scores"][s]["mean"] - base_random[s]["mean"]
            tuned[model] = {"gain": g, "standardised_gain": g / std if std > 0 else float("nan")}
        if REFL in tuned:
            inflation[s]["refl_gain"] = tuned[REFL]["gain"]
            inflation[s]["refl_standardised_gain"] = tuned[REFL]["standardised_gain"]
        if tuned:
            inflation[s]["tuned"] = tuned
    sel_gain = inflation[sel]["standardised_gain"]
    for s in specs:
        inflation[s]["selector_minus_evaluator"] = sel_gain - inflation[s]["standardised_gain"]
    return inflation


def win_rates(cfg: CompareConfig, scores: dict[str, dict[str, np.ndarray]], arms: dict) -> dict:
    """Per evaluator, per-prompt win shares (mean and 95% interval; ties half) of every tuned model against
    base (its one sample and, with tuned_best_of, its best-of-M, each against base's one sample and best-of-N)
    and of every two tuned models against each other (one sample, sample i against sample i: the same seeds;
    and best-of-M against best-of-M), then of base's best-of-N against its one sample. Keys are
    evaluation.arms.comparison_name(arm, other)."""
    tuned = [m for m in scores if m != BASE]
    best_base, base_random = arm_name(BASE, cfg.n_samples), arm_name(BASE)

    def best(arm: str, s: str) -> np.ndarray:
        return np.asarray(arms[arm]["per_prompt"][s])[:, None]  # (P, 1)

    out = {}
    for s in cfg.evaluator_specs():
        base_all = scores[BASE][s]  # (P, N)
        pairs: dict[str, np.ndarray] = {}
        for model in tuned:
            tuned_all = scores[model][s]  # (P, M)
            m = tuned_all.shape[1]
            one = arm_name(model)
            # same seeds: tuned sample i against base sample i
            pairs[comparison_name(one, base_random)] = win_shares(tuned_all, base_all[:, :m])
            pairs[comparison_name(one, best_base)] = win_shares(tuned_all, best(best_base, s))
            if cfg.tuned_best_of:
                top = arm_name(model, m)
                pairs[comparison_name(top, base_random)] = win_shares(best(top, s), base_all)
                pairs[comparison_name(top, best_base)] = win_shares(best(top, s), best(best_base, s))
        for i, model in enumerate(tuned):
            for other in tuned[i + 1 :]:
                pairs[comparison_name(arm_name(model), arm_name(other))] = win_shares(scores[model][s],
                                                                                      scores[other][s])
                if cfg.tuned_best_of:
                    a, b = (arm_name(x, scores[x][s].shape[1]) for x in (model, other))
                    pairs[comparison_name(a, b)] = win_shares(best(a, s), best(b, s))
        pairs[comparison_name(best_base, base_random)] = win_shares(best(best_base, s), base_all)
        out[s] = {k: mean_ci(v, n_resamples=cfg.bootstrap_resamples) for k, v in pairs.items()}
    return out


def headline_arms(cfg: CompareConfig, scores: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """The arms a verdict speaks of: base's best-of-N, then each tuned model's one sample and (with
    tuned_best_of) its best-of-M."""
    out = [arm_name(BASE, cfg.n_samples)]
    for model in scores:
        if model != BASE:
            out.append(arm_name(model))
            if cfg.tuned_best_of:
                out.append(arm_name(model, scores[model][cfg.selector_spec].shape[1]))
    return out


def change_from_base(cfg: CompareConfig, scores: dict[str, dict[str, np.ndarray]], arms: dict) -> dict:
    """Per evaluator, each headline arm's mean score minus base's one sample, paired per prompt, with its 95%
    interval: what the arm changed."""
    base = arms[arm_name(BASE)]["per_prompt"]
    return {s: {arm: mean_ci(np.asarray(arms[arm]["per_prompt"][s]) - np.asarray(base[s]),
                             n_resamples=cfg.bootstrap_resamples)
                for arm in headline_arms(cfg, scores)}
            for s in cfg.evaluator_specs()}


def compute_statistics(cfg: CompareConfig, prompts: list[str], scores: dict[str, dict[str, np.ndarray]],
                       diversity: dict[str, np.ndarray], seconds: dict[str, float]) -> dict:
    """Every number of results.json from per-image scores.

    scores[model][spec]: (P, n_model) per-image scores, base first; diversity[model]: (P,); seconds: per-image
    sampling seconds per model and selector seconds per image ("selector").
    """
    arms, curves = arm_rows(cfg, scores, seconds)
    return {
        "prompts": prompts,
        "selector": cfg.selector_spec,
        "evaluators": cfg.evaluator_specs(),
        "n_samples": cfg.n_samples,
        "n_tuned_samples": cfg.n_tuned if len(scores) > 1 else 0,
        "models": list(scores),
        "n_grid": curves,
        "unet_evals_per_image": cfg.num_inference_steps * cfg.cfg_factor,
        "seconds_per_image": seconds,
        "arms": arms,
        "win_rates": win_rates(cfg, scores, arms),
        "change_from_base": change_from_base(cfg, scores, arms),
        "inflation": selection_inflation(cfg, scores, arms),
        # Prompts whose diversity is undefined (fewer than two samples) are left out of the mean.
        "diversity": {m: mean_ci(d[~np.isnan(d)],
                                 n_resamples=cfg.bootstrap_resamples) | {"per_prompt": d.tolist()}
                      for m, d in diversity.items()},
    }
