"""Evaluators: one interface for scoring stored images, created from spec strings.

An evaluator is a callable `(images, prompts) -> np.ndarray` of shape (N,), higher = better, where
`images` is a uint8 array (N, H, W, 3) (the format samples are stored in) and `prompts` a list of N
strings. Specs are `kind:argument` strings resolved through the `EVALUATORS` registry:

- `critic:PATH_OR_NAME`  a Social Reward critic (`reward.load`): its calibrated score;
- `ensemble:A,B[,...][,penalty=K]`  critics A, B, ... (each as `critic:` reads it) as one
                         reward.ensemble.CriticEnsemble: mean - K x std of their calibrated scores (K = 0);
- `clip:NAME`            CLIP score, 100 * cos(text, image), of an untuned open_clip model
                         (`ViT-L-14:openai`, or a shipped config such as `tiny-clip`);
- `pickscore:PATH`, `hpsv2:PATH`, `hpsv21:PATH`, `imagereward:PATH`, `aesthetic:PATH`, `clipscore:NAME`:
                         the standard reward models (reward/standard/; PATH may be a hub id), each
                         with its upstream preprocessing applied to the stored images.

The registry lives here, below refl/, so that training and the comparison harness (evaluation/) can
both use it; it names no package above reward/. Other packages add kinds in two ways:

- at run time, `register_evaluator(kind, factory)`;
- declaratively, as a Python entry point in the group `social_refl.evaluators` (`kind =
  "module:function"`), looked up the first time a spec names a kind that is not registered. The
  toy world declares `oracle` and `fidelity` this way in pyproject.toml (they exist once the package
  is installed, `pip install -e .`).

A factory is called only when a spec of its kind is created, and may be given as a
`"module:function"` string, so that registering imports nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, Union

import numpy as np
import torch

from reward.standard import STANDARD_KINDS
from runkit.files import content_hash

STANDARD_KIND_NAMES = tuple(STANDARD_KINDS)
# Entry-point group through which installed packages declare evaluator kinds.
ENTRY_POINT_GROUP = "social_refl.evaluators"

logger = logging.getLogger(__name__)


class Evaluator(Protocol):
    name: str  # the spec it was created from; the key of its numbers in results.json
    fingerprint: str  # the spec plus a hash of the files it reads: cached scores are keyed by it

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


# factory(argument, device) -> Evaluator, or "module:function" naming such a factory (imported lazily).
Factory = Union[Callable[[str, str], Evaluator], str]


def images_to_tensor(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"evaluators take uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)  # (N, H, W, 3)
    return x.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)


class CriticEvaluator:
    """A `SocialReward` as an evaluator (also the selector); `clip_score` gives 100 * raw cosine."""

    def __init__(self, name: str, model, clip_score: bool = False, batch_size: int = 64):
        self.name = name
        self.model = model
        # True: 100 * cos of the untuned backbone; False: calibrated critic score
        self.clip_score = clip_score
        self.batch_size = batch_size

    @torch.no_grad()
    def score_and_embed(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[np.ndarray, torch.Tensor]:
        """Scores (N,) and the normalised image embeddings (N, D) they came from (one image pass)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        unique = list(dict.fromkeys(prompts))
        txt = self.model.encode_text(unique)  # (P, D), one text pass per distinct prompt
        rows = torch.tensor([unique.index(p) for p in prompts], device=txt.device)  # (N,)
        img = self.embed(images)  # (N, D)
        cos = (img * txt[rows]).sum(-1)  # (N,)
        scores = 100.0 * cos if self.clip_score else self.model.calibrated(cos)
        return scores.double().cpu().numpy(), img

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on the model's device."""
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images_to_tensor(images[start : start + self.batch_size], self.model.device)  # (b, 3, H, W)
            out.append(self.model.encode_image(x))  # (b, D)
        return torch.cat(out)  # (N, D)

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return self.score_and_embed(images, prompts)[0]


class ModelEvaluator:
    """A differentiable reward model `(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` (a standard reward
    model of reward.standard, or a critic ensemble) as an evaluator: its score, in batches, without
    gradient."""

    def __init__(self, name: str, model, batch_size: int = 16):
        self.name = name
        self.model = model
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), self.batch_size):
            x = images_to_tensor(images[start : start + self.batch_size], self.model.device)  # (b, 3, H, W)
            out.append(self.model(x, list(prompts[start : start + self.batch_size])).double().cpu())  # (b,)
        return torch.cat(out).numpy()  # (N,)


def _standard_factory(kind: str) -> Callable[[str, str], ModelEvaluator]:
    def factory(argument: str, device: str) -> ModelEvaluator:
        from reward.standard import load_standard

        return ModelEvaluator(f"{kind}:{argument}", load_standard(f"{kind}:{argument}", device=device))

    return factory


def _critic_factory(argument: str, device: str) -> CriticEvaluator:
    import reward

    return CriticEvaluator(f"critic:{argument}", reward.load(argument, device=device))


def _ensemble_factory(argument: str, device: str) -> ModelEvaluator:
    import reward
    from reward.ensemble import CriticEnsemble

    parts = [p for p in argument.split(",") if p]
    options = dict(p.split("=", 1) for p in parts if "=" in p)
    unknown = sorted(set(options) - {"penalty"})
    if unknown:
        raise ValueError(f"ensemble:{argument}: unknown option(s) {unknown}; the one option is penalty=K")
    members = [reward.load(p, device=device) for p in parts if "=" not in p]
    return ModelEvaluator(f"ensemble:{argument}", CriticEnsemble(members, float(options.get("penalty", 0.0))),
                          batch_size=64)


def _clip_factory(argument: str, device: str) -> CriticEvaluator:
    import reward

    return CriticEvaluator(f"clip:{argument}", reward.load(argument, device=device), clip_score=True)


EVALUATORS: dict[str, Factory] = {
    "critic": _critic_factory,
    "clip": _clip_factory,
    "ensemble": _ensemble_factory,
    # The standard reward models; their loaders import open_clip / transformers only when called.
    **{kind: _standard_factory(kind) for kind in STANDARD_KIND_NAMES},
}


def register_evaluator(kind: str, factory: Factory, overwrite: bool = False) -> None:
    """Make `kind:argument` specs create evaluators with `factory(argument, device)`.

    `factory` may be a callable or a `"package.module:function"` string, imported on first use.
    """
    if not kind or ":" in kind:
        raise ValueError(f"evaluator kind must be a non-empty name without ':', got {kind!r}")
    if kind in EVALUATORS and not overwrite and EVALUATORS[kind] is not factory:
        raise ValueError(f"evaluator kind {kind!r} is already registered; pass overwrite=True to replace it")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"a lazy evaluator factory is 'module:function', got {factory!r}")
    EVALUATORS[kind] = factory


def _resolve(factory: Factory) -> Callable[[str, str], Evaluator]:
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"evaluator factory {factory!r} cannot be imported: {err}") from err


def _entry_point_factories() -> dict[str, str]:
    """kind -> "module:function" for every evaluator an installed package declares (nothing imported)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


# The kinds whose argument is one critic-like model that commands also take bare: a trained critic folder (or
# an open_clip name loaded as a critic), and an untuned open_clip model scored by its CLIP score.
MODEL_KINDS = ("critic", "clip")


def model_spec(spec: str) -> tuple[str, str]:
    """A critic as every command takes it -> (kind, model): `critic:DIR` and `clip:NAME[:PRETRAINED]` as the
    evaluator specs spell them, or the bare `DIR` / `NAME[:PRETRAINED]` (kind "critic")."""
    kind, _, rest = spec.partition(":")
    return (kind, rest) if kind in MODEL_KINDS and rest else ("critic", spec)


def parse_spec(spec: str) -> tuple[str, str]:
    """`kind:argument` -> (kind, argument); the argument may itself contain ':' (`clip:ViT-L-14:openai`).

    A kind not registered yet is looked up among the entry points and registered from there."""
    kind, sep, argument = spec.partition(":")
    if kind not in EVALUATORS:
        declared = _entry_point_factories()
        if kind not in declared:
            raise ValueError(
                f"unknown evaluator kind {kind!r} in spec {spec!r}; registered kinds: {sorted(EVALUATORS)}; "
                f"entry-point kinds (group {ENTRY_POINT_GROUP!r}): {sorted(declared)} "
                "(specs look like 'critic:runs/critic' or 'clip:ViT-L-14:openai')")
        register_evaluator(kind, declared[kind])
    return kind, argument


class _Checked:
    """Wraps a plug-in's callable: names it by its spec and checks what it returns."""

    def __init__(self, name: str, fn: Callable):
        self.name = name
        self.fn = fn

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        scores = np.asarray(self.fn(images, list(prompts)), dtype=np.float64).reshape(-1)  # (N,)
        if scores.shape != (len(images),):
            raise ValueError(f"evaluator {self.name} returned {scores.shape[0]} scores for {len(images)} "
                             "images")
        return scores


def _standard_content_hash(argument: str) -> str:
    """A standard reward's argument names files inside `PATH,option=VALUE` and `NAME:PATH`: hash each
    piece."""
    pieces = []
    for part in argument.split(","):
        value = part.partition("=")[2] if "=" in part else part
        pieces += [value] if Path(value).exists() else value.split(":")
    return ";".join(content_hash(p) for p in pieces)


def create_evaluator(spec: str, device: str = "cpu") -> Evaluator:
    """The one factory for evaluators: `kind:argument` through the registry."""
    kind, argument = parse_spec(spec)
    evaluator = _resolve(EVALUATORS[kind])(argument, device)
    if not callable(evaluator):
        raise TypeError(f"the factory of evaluator kind {kind!r} returned {type(evaluator).__name__}, not a "
                        "callable")
    if not isinstance(evaluator, CriticEvaluator):
        evaluator = _Checked(spec, evaluator)
    evaluator.name = spec
    # What its scores are cached under: the spec and the content of the files it names.
    # Standard and ensemble arguments name several files (comma-separated): each one is hashed.
    several = kind in STANDARD_KINDS or kind == "ensemble"
    evaluator.fingerprint = (f"{spec}|"
                             f"{_standard_content_hash(argument) if several else content_hash(argument)}")
    logger.info("evaluator %s ready", spec)
    return evaluator
