"""What the demo reads out of a finished comparison: the oracle's terms per arm, and the arms a newcomer
asks about."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.arms import arm_name, largest_best_of, model_label


def arm_label(model: str, n: int | None = None) -> str:
    """An arm as the demo's summary and breakdown name it: "base", "base best-of-64", "ReFL", "DPO"."""
    return model_label(model) + ("" if n is None else f" best-of-{n}")


def arm_oracle_terms(out: Path, results: dict, arms: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per arm of a comparison in `out` and per oracle term, its value on each held-out prompt (P,): the mean
    over the model's samples for a one-sample arm, the selector's pick (results' chosen_index) for a
    best-of-n arm. Each model's samples are measured once per prompt."""
    from evaluation.arms import BASE, parse_arm
    from evaluation.layout import samples_path
    from toyworld.oracle import TERMS, oracle_terms

    parsed = {arm: parse_arm(arm) for arm in arms}
    per_prompt = {arm: {t: [] for t in TERMS} for arm in arms}
    for p, prompt in enumerate(results["prompts"]):
        for model in dict.fromkeys(m for m, _ in parsed.values()):
            count = results["n_samples"] if model == BASE else results["n_tuned_samples"]
            images = np.load(samples_path(out, model, p))["images"][:count]  # (count, H, W, 3)
            terms = oracle_terms(images, [prompt] * len(images))  # term -> (count,)
            for arm, (m, n) in parsed.items():
                if m != model:
                    continue
                pick = None if n is None else int(results["arms"][arm]["chosen_index"][p])
                for t in TERMS:
                    per_prompt[arm][t].append(terms[t].mean() if pick is None else terms[t][pick])
    return {arm: {t: np.asarray(v) for t, v in terms.items()} for arm, terms in per_prompt.items()}


def oracle_breakdown(out: Path, results: dict) -> dict:
    """What each arm changed in the hidden taste, term by term: mean oracle term per held-out prompt for
    base (one sample), base best-of-N (the selector's pick) and ReFL (one sample), and the paired
    difference of the latter two from base with a 95% bootstrap interval over prompts."""
    from evaluation.stats import mean_ci
    from toyworld.oracle import DEFAULT_WEIGHTS, TERMS

    n, m = results["n_samples"], results["n_tuned_samples"]
    tuned = arm_name("refl") in results["arms"] and m
    arms = [arm_name("base"), arm_name("base", n)] + ([arm_name("refl")] if tuned else [])
    labels = {arm_name("base"): arm_label("base"), arm_name("base", n): arm_label("base", n),
              arm_name("refl"): arm_label("refl")}
    per_prompt = {labels[arm]: terms for arm, terms in arm_oracle_terms(out, results, arms).items()}
    base = per_prompt[labels[arm_name("base")]]
    return {
        "weights": {t: DEFAULT_WEIGHTS[t] for t in TERMS},
        "mean": {arm: {t: float(v.mean()) for t, v in terms.items()} for arm, terms in per_prompt.items()},
        "difference_from_base": {arm: {t: mean_ci(v - base[t]) for t, v in terms.items()}
                                 for arm, terms in per_prompt.items() if arm != labels[arm_name("base")]},
    }


def compare_summary(results: dict) -> dict:
    """Mean and 95% interval per arm for each evaluator, for the arms a newcomer asks about."""
    arms = results["arms"]
    best, n = largest_best_of(arms, "base")
    chosen = {arm_label("base"): arm_name("base"), arm_label("base", n): best,
              arm_label("refl"): arm_name("refl")}
    return {label: {s: arms[arm]["scores"][s] for s in results["evaluators"]} for label, arm in chosen.items()
            if arm in arms} | {"_evaluators": results["evaluators"], "_selector": results["selector"]}


def promise(results: dict, critic: dict) -> dict:
    """Did the product's promise hold on this world: ReFL's one sample against the base's on the oracle, per
    prompt (goal: the 95% interval above 0) and on prompt fidelity (goal: within 5 points), best-of-N by the
    critic beside it at N times the sampling, and the critic against the oracle and zero-shot."""
    from evaluation.stats import mean_ci

    arms, n = results["arms"], results["n_samples"]
    best, n_best = largest_best_of(arms, "base")
    base, refl = arms[arm_name("base")], arms.get(arm_name("refl"))
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    fidelity = next((s for s in results["evaluators"] if s.startswith("fidelity")), None)

    def diff(arm: dict, spec: str) -> dict:
        return mean_ci(np.asarray(arm["per_prompt"][spec]) - np.asarray(base["per_prompt"][spec]))

    out = {"best_of_n": n_best, "best_of_n_minus_base": diff(arms[best], oracle),
           "critic_accuracy": critic["accuracy_vs_oracle"]["pairwise_accuracy"],
           "zero_shot_accuracy": critic["zero_shot_clip_vs_oracle"]["pairwise_accuracy"], "n_samples": n}
    if refl is not None:
        out["refl_minus_base"] = diff(refl, oracle)
        out["fidelity_minus_base"] = diff(refl, fidelity)["mean"] if fidelity else None
        out["held"] = bool(out["refl_minus_base"]["ci95"][0] > 0
                           and (out["fidelity_minus_base"] is None or out["fidelity_minus_base"] >= -0.05))
    return out
