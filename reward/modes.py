"""Social Reward's `training_mode`s: which parameters of an open_clip CLIP train.

The paper's modes are defined on ViT-L/14 (24 vision blocks, 12 text blocks). Here each mode is
"the last k vision blocks / last m text blocks" (plus the norms and projections above them), so the
same names mean the same idea on any open_clip ViT, including the tiny ones used in tests.
Frozen parameters get `requires_grad_(False)`, so they hold no gradients and cost no optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModeSpec:
    # None = every parameter of the model trains.
    vision_blocks: int | None
    # Last text blocks that train (0 = the text tower stays frozen).
    text_blocks: int
    # True = the whole visual tower trains (mode "visual").
    whole_visual: bool = False


# Counts taken from the paper's ViT-L/14 slices: vision [21:] = last 3, text [10:] = last 2, etc.
TRAINING_MODES: dict[str, ModeSpec] = {
    "all": ModeSpec(vision_blocks=None, text_blocks=0),
    "visual": ModeSpec(vision_blocks=0, text_blocks=0, whole_visual=True),
    "visual_upper_layers": ModeSpec(vision_blocks=3, text_blocks=0),
    "visual_upper_layers_textual_upper_layers": ModeSpec(vision_blocks=3, text_blocks=2),
    "visual_upper_layers_textual_upper_layers_deeper": ModeSpec(vision_blocks=4, text_blocks=3),
    "visual_last_layer": ModeSpec(vision_blocks=1, text_blocks=0),
}


def _text_tower(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(module holding the text transformer, names of the modules above its blocks)."""
    if hasattr(model, "text"):  # CustomTextCLIP
        return model.text, ["ln_final", "text_projection", "proj"]
    return model, ["ln_final", "text_projection"]


def trainable_parameter_names(model: nn.Module, mode: str) -> set[str]:
    if mode not in TRAINING_MODES:
        raise ValueError(f"unknown training_mode {mode!r}; choose one of {', '.join(TRAINING_MODES)}")
    spec = TRAINING_MODES[mode]
    # The score is a plain cosine: CLIP's logit_scale never enters it, so it never trains (and an
    # unused trainable parameter would make DDP fail).
    names = {n for n, _ in model.named_parameters() if n != "logit_scale"}
    if spec.vision_blocks is None:
        return names
    if not hasattr(model, "visual") or not hasattr(model.visual, "transformer"):
        raise ValueError(f"training_mode {mode!r} needs an open_clip ViT (a visual.transformer); "
                         f"{type(model.visual).__name__} has none. Use training_mode=all.")
    if spec.whole_visual:
        return {n for n in names if n.startswith("visual.")}
    chosen: set[str] = set()
    n_vis = len(model.visual.transformer.resblocks)
    for i in range(max(0, n_vis - spec.vision_blocks), n_vis):
        chosen |= {n for n in names if n.startswith(f"visual.transformer.resblocks.{i}.")}
    chosen |= {n for n in names if n.startswith("visual.ln_post.")}
    if spec.text_blocks:
        tower, heads = _text_tower(model)
        prefix = "text." if tower is not model else ""
        n_txt = len(tower.transformer.resblocks)
        for i in range(max(0, n_txt - spec.text_blocks), n_txt):
            chosen |= {n for n in names if n.startswith(f"{prefix}transformer.resblocks.{i}.")}
        for head in heads:
            chosen |= {n for n in names if n == prefix + head or n.startswith(f"{prefix}{head}.")}
    return chosen


def apply_training_mode(model: nn.Module, mode: str) -> set[str]:
    """Freeze everything outside `mode`; returns the names that train."""
    chosen = trainable_parameter_names(model, mode)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return chosen
