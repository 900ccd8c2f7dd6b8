"""The interface every standard reward model has, and the preprocessing it shares.

`StandardReward`: `model(images, prompts) -> (B,)` float32 scores, `images` (B, 3, H, W) in [0, 1] of
any size, differentiable down to the pixels. Each model's upstream resize / crop / pad / normalise is
an `ImageTransform`, redone in torch by `transform_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsError(ValueError):
    """A reward model's weights are missing or do not match; the message names the path and the layout."""


@dataclass(frozen=True)
class ImageTransform:
    size: int  # output side S: the model sees (B, 3, S, S)
    mean: tuple[float, float, float] = OPENAI_MEAN  # per-channel normalisation after resizing
    std: tuple[float, float, float] = OPENAI_STD
    # "crop": shortest side to S (long side truncated to int, as torchvision and transformers do), centre
    # crop; "pad": longest side to S (rounded), zero (black) padding to a square (HPS v2's ResizeMaxSize);
    # "squash": both sides to S.
    mode: str = "crop"
    # Centre-crop offset: "round" (torchvision CenterCrop: round((H - S) / 2)) or "floor" (transformers'
    # center_crop: (H - S) // 2); they differ by one pixel when H - S is odd.
    crop_offset: str = "round"
    interpolation: str = "bicubic"  # "bicubic" or "bilinear", with antialiasing like PIL
    # Upstream resized 8-bit PIL images, whose values cannot leave [0, 1]; bicubic overshoot is clipped
    # to match. False where upstream resized float tensors (HPS v2).
    clamp: bool = True


def _crop_offset(excess: int, how: str) -> int:
    return int(round(excess / 2.0)) if how == "round" else excess // 2


def transform_images(images: torch.Tensor, t: ImageTransform) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised (B, 3, S, S), differentiable; see `ImageTransform`."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("reward models take images of shape (B, 3, H, W) in [0, 1], got "
                         f"{tuple(images.shape)}")
    h, w = images.shape[-2:]
    s = t.size

    def resize(x, size):
        if tuple(size) == (h, w):
            return x
        x = F.interpolate(x, size=size, mode=t.interpolation, align_corners=False, antialias=True)
        return x.clamp(0, 1) if t.clamp else x

    if t.mode == "crop":
        long = int(s * max(h, w) / min(h, w))
        nh, nw = (s, long) if h <= w else (long, s)
        images = resize(images, (nh, nw))  # (B, 3, nh, nw)
        top, left = _crop_offset(nh - s, t.crop_offset), _crop_offset(nw - s, t.crop_offset)
        images = images[:, :, top : top + s, left : left + s]  # (B, 3, S, S)
    elif t.mode == "pad":
        scale = s / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        images = resize(images, (nh, nw))  # (B, 3, nh, nw)
        # Upstream skips the padding too when the long side is already S, handing the ViT a non-square
        # image it cannot take; padding it is the only input that works.
        ph, pw = s - nh, s - nw
        if ph or pw:
            images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)  # (B, 3, S, S)
    elif t.mode == "squash":
        images = resize(images, (s, s))  # (B, 3, S, S)
    else:
        raise ValueError(f"unknown ImageTransform.mode {t.mode!r}; use 'crop', 'pad' or 'squash'")
    mean = images.new_tensor(t.mean).view(1, 3, 1, 1)
    std = images.new_tensor(t.std).view(1, 3, 1, 1)
    return (images - mean) / std


class StandardReward(nn.Module):
    """Base class: `forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32, differentiable."""

    kind = "standard"

    def __init__(self, transform: ImageTransform):
        super().__init__()
        self.transform = transform
        self.source = ""  # where the weights came from (a path or hub id), for reports

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def image_size(self) -> int:
        return self.transform.size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's normalised input (B, 3, S, S), in the model's dtype."""
        return transform_images(images.to(self.device), self.transform).to(self.dtype)

    @staticmethod
    def _prompts(prompts: Sequence[str] | str, batch: int) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) == 1 and batch > 1:
            prompts = prompts * batch
        if len(prompts) != batch:
            raise ValueError(f"{batch} images but {len(prompts)} prompts")
        return prompts

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Recompute the image tower in backward (less memory for ReFL); False where the model cannot:
        transformers' models checkpoint only in train mode, and a reward runs in eval mode."""
        return False

    def score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | str) -> torch.Tensor:
        prompts = self._prompts(prompts, images.shape[0])
        return self.score(self.preprocess(images), prompts).float().reshape(-1)  # (B,)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension, in float32 (cosine scores are taken in full precision)."""
    return F.normalize(x.float(), dim=-1)


class ScoreMLP(nn.Module):
    """The head of the LAION aesthetic predictor v2 and of ImageReward: five linear layers, dropouts
    between the first four and no activation (both release files were trained this way); key names
    `layers.{0,2,4,6,7}` as released."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, 1)
