"""The standard reward models, behind one differentiable interface.

Every model here is a `StandardReward`: `model(images, prompts) -> (B,)` float32 scores, where
`images` is (B, 3, H, W) in [0, 1] of any size and `prompts` holds B strings (or one, shared). The
resize / crop / pad / normalise of each model's upstream scoring code is redone in torch
(`ImageTransform`), so gradients reach the pixels and ReFL can maximise any of them.

Kinds (`STANDARD_KINDS`), each loaded from a spec `kind:ARGUMENT[,option=value...]`:

| kind        | score                                           | ARGUMENT (local path, or hub id; empty = default hub id) |
|-------------|-------------------------------------------------|-----------------------------------------------------------|
| clipscore   | 100 * cos(text, image) of an open_clip model    | open_clip `NAME[:PRETRAINED]` (default ViT-L-14-quickgelu:openai) |
| aesthetic   | LAION aesthetic v2 MLP(normalised ViT-L-14 emb) | the MLP file `sac+logos+ava1-l14-linearMSE.pth`           |
| pickscore   | logit_scale.exp() * cos, transformers CLIPModel | a CLIPModel folder (hub: yuvalkirstain/PickScore_v1)      |
| hpsv2       | cos of open_clip ViT-H-14 + HPS checkpoint      | `HPS_v2_compressed.pt` (hub: xswu/HPSv2)                  |
| hpsv21      | same, HPS v2.1 weights                          | `HPS_v2.1_compressed.pt` (hub: xswu/HPSv2)                |
| imagereward | BLIP ViT-L + BERT cross-attn + MLP, normalised  | folder with ImageReward.pt, med_config.json (hub: THUDM/ImageReward) |

Options: `model=` an open_clip architecture other than the released one (tiny test configs),
`backbone=NAME:PRETRAINED` (aesthetic's CLIP), `tokenizer=` (imagereward's BERT vocabulary).

Why thin loaders instead of the upstream packages: `hpsv2` vendors its own fork of open_clip (two
open_clips in one process, and its scoring reads PIL images only); `image-reward` pins 2023
transformers/timm and builds BLIP from its own copy of `med.py`; PickScore and the aesthetic
predictor ship no package at all. The weights files are the released ones, read as released.

Modules: `base` (the interface and preprocessing), `files` (weights files and the hub), `clip` (CLIP score,
aesthetic, HPS v2, PickScore), `imagereward` (ImageReward on transformers' BLIP); this module holds the
registry of kinds and the one factory, `load_standard`.
"""  # noqa: E501

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from reward.standard.base import ImageTransform, ScoreMLP, StandardReward, WeightsError, transform_images
from reward.standard.clip import (
    check_aesthetic,
    check_clipscore,
    check_hps,
    check_pickscore,
    load_aesthetic,
    load_clipscore,
    load_hps,
    load_pickscore,
)
from reward.standard.imagereward import check_imagereward, load_imagereward

__all__ = ["STANDARD_KINDS", "ImageTransform", "ScoreMLP", "StandardKind", "StandardReward", "WeightsError",
           "check_spec", "is_standard_spec", "load_standard", "parse_standard_spec", "transform_images"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StandardKind:
    loader: Callable[[str, dict], StandardReward]  # (argument, options) -> model on the CPU, eval mode
    # (argument, options) -> None: resolves the files and names the loader will read, without loading weights;
    # raises WeightsError / ValueError / FileNotFoundError naming what is wrong.
    check: Callable[[str, dict], None]
    options: tuple[str, ...] = ()  # option names allowed after the argument (`,name=value`)


STANDARD_KINDS: dict[str, StandardKind] = {
    "clipscore": StandardKind(load_clipscore, check_clipscore),
    "aesthetic": StandardKind(load_aesthetic, check_aesthetic, ("backbone",)),
    "pickscore": StandardKind(load_pickscore, check_pickscore),
    "hpsv2": StandardKind(load_hps("hpsv2", "HPS_v2_compressed.pt"),
                          check_hps("hpsv2", "HPS_v2_compressed.pt"), ("model",)),
    "hpsv21": StandardKind(load_hps("hpsv21", "HPS_v2.1_compressed.pt"),
                           check_hps("hpsv21", "HPS_v2.1_compressed.pt"), ("model",)),
    "imagereward": StandardKind(load_imagereward, check_imagereward, ("tokenizer",)),
}


def parse_standard_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`kind:ARGUMENT[,name=value...]` -> (kind, argument, options); the argument may contain ':'."""
    kind, _, rest = spec.partition(":")
    if kind not in STANDARD_KINDS:
        raise ValueError(f"unknown standard reward {kind!r} in {spec!r}; choose one of "
                         f"{sorted(STANDARD_KINDS)}")
    argument, *pairs = rest.split(",")
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in STANDARD_KINDS[kind].options:
            allowed = ", ".join(f"{o}=..." for o in STANDARD_KINDS[kind].options) or "none"
            raise ValueError(f"{spec!r}: bad option {pair!r} for {kind} (allowed: {allowed})")
        options[name] = value
    return kind, argument.strip(), options


def is_standard_spec(spec: str) -> bool:
    return spec.partition(":")[0] in STANDARD_KINDS


def check_spec(spec: str) -> None:
    """A model spec resolved without loading any weights, so a typo stops a command before its work: a
    standard reward `kind:ARGUMENT[,options]` (kind, options, weight files), or a critic (a saved critic
    folder, or an open_clip NAME[:PRETRAINED] open_clip lists). Raises a one-line error naming the fix."""
    if is_standard_spec(spec):
        kind, argument, options = parse_standard_spec(spec)
        STANDARD_KINDS[kind].check(argument, options)
        return
    from reward.model import check_source, resolve_model_name

    kind = spec.partition(":")[0]
    if ":" in spec and "/" not in kind and not Path(spec).exists():
        try:
            resolve_model_name(kind)
        except ValueError as err:
            raise ValueError(f"unknown model {kind!r}: neither a standard reward kind "
                             f"({', '.join(STANDARD_KINDS)}) nor an open_clip model name "
                             "(open_clip.list_models()); check the spelling") from err
    check_source(spec)


def load_standard(spec: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> StandardReward:
    """The one factory: a spec (`hpsv2:weights/HPS_v2_compressed.pt`) -> a frozen model in eval mode."""
    kind, argument, options = parse_standard_spec(spec)
    model = STANDARD_KINDS[kind].loader(argument, options)
    model.requires_grad_(False).eval()
    logger.info("standard reward %s loaded from %s", kind, model.source or argument)
    return model.to(device=device, dtype=dtype)
