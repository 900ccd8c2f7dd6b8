"""The arms of a comparison, as results.json names them; every arm name is made and read here.

- `{model}_random`: one random sample of the model (the mean over its samples);
- `{model}_best_of_{n}`: the selector's pick among the model's first n samples;

where `model` is "base" (the untuned model) or a tuned model: "refl" (CompareConfig.lora) or a name of
CompareConfig.loras ("dpo", "kto", a user's own; letters, digits and hyphens, so that an arm name and a
comparison `{arm}_vs_{arm}` read back unambiguously).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BASE = "base"  # the untuned model: samples/base/ on disk
REFL = "refl"  # the tuned model of CompareConfig.lora
# A model's name: samples/{model}/ on disk and the first part of its arms' names.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ARM = re.compile(r"(?P<model>[A-Za-z0-9][A-Za-z0-9-]*)_(?:random|best_of_(?P<n>[0-9]+))")
# How tables and plots name a model; any other model is named as it is.
LABELS = {BASE: "base", REFL: "ReFL", "dpo": "DPO", "kto": "KTO"}


def check_model_name(model: str) -> str:
    """`model` when it is a valid model name; ValueError naming the rule otherwise."""
    if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
        raise ValueError(f"{model!r} is not a model name: letters, digits and hyphens, starting with a "
                         "letter or digit (e.g. dpo, kto, dpo-beta2)")
    return model


def arm_name(model: str, n: int | None = None) -> str:
    """`{model}_random` without `n`, else `{model}_best_of_{n}`."""
    check_model_name(model)
    return f"{model}_random" if n is None else f"{model}_best_of_{n}"


def parse_arm(name: str) -> tuple[str, int | None]:
    """(model, n) of an arm name, n None for the random arm; ValueError for any other string."""
    match = _ARM.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"{name!r} is not an arm name ({{model}}_random or {{model}}_best_of_{{n}}, the "
                         "model's name of letters, digits and hyphens)")
    return match["model"], None if match["n"] is None else int(match["n"])


def comparison_name(arm: str, other: str) -> str:
    """The win-rate key of `arm` against `other` (both arm names): `{arm}_vs_{other}`."""
    return f"{arm}_vs_{other}"


def parse_comparison(name: str) -> tuple[str, str]:
    """(arm, other) of a win-rate key; ValueError for any other string."""
    arm, sep, other = name.partition("_vs_")
    if not sep:
        raise ValueError(f"{name!r} is not a comparison ({{arm}}_vs_{{arm}})")
    parse_arm(arm), parse_arm(other)
    return arm, other


def model_label(model: str) -> str:
    """A model as tables, plots and verdicts name it: "base", "ReFL", "DPO", "KTO", or a user's name."""
    return LABELS.get(model, model)


def models_of(arms: Iterable[str]) -> list[str]:
    """The models of these arms, in order of first appearance."""
    return list(dict.fromkeys(parse_arm(a)[0] for a in arms))


def largest_best_of(arms: Iterable[str], model: str) -> tuple[str, int] | None:
    """(name, n) of `model`'s best-of-n arm with the largest n among `arms`; None when it has none."""
    best = [(n, name) for name in arms for m, n in [parse_arm(name)] if m == model and n is not None]
    if not best:
        return None
    n, name = max(best)
    return name, n
