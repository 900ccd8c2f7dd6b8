"""The arms of a comparison, as results.json names them; every arm name is made and read here.

- `{model}_random`: one random sample of the model (the mean over its samples);
- `{model}_best_of_{n}`: the selector's pick among the model's first n samples;

where `model` is one of `MODELS`: "base" (the untuned model) or "refl" (base + LoRA).
"""

from __future__ import annotations

from collections.abc import Iterable

MODELS = ("base", "refl")  # the sample sets a comparison draws: samples/{model}/ on disk


def arm_name(model: str, n: int | None = None) -> str:
    """`{model}_random` without `n`, else `{model}_best_of_{n}`."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; models are {MODELS}")
    return f"{model}_random" if n is None else f"{model}_best_of_{n}"


def parse_arm(name: str) -> tuple[str, int | None]:
    """(model, n) of an arm name, n None for the random arm; ValueError for any other string."""
    model, _, rest = name.partition("_")
    count = rest.removeprefix("best_of_")
    if model in MODELS and (rest == "random" or (count != rest and count.isdigit())):
        return model, None if rest == "random" else int(count)
    raise ValueError(f"{name!r} is not an arm name ({{model}}_random or {{model}}_best_of_{{n}}, "
                     f"model one of {MODELS})")


def largest_best_of(arms: Iterable[str], model: str) -> tuple[str, int] | None:
    """(name, n) of `model`'s best-of-n arm with the largest n among `arms`; None when it has none."""
    best = [(n, name) for name in arms for m, n in [parse_arm(name)] if m == model and n is not None]
    if not best:
        return None
    n, name = max(best)
    return name, n
