"""The Social Reward critic: an open_clip CLIP whose score is cos(text, image).

One model, two ways in:
- `score` / `inference_rank` take files or PIL images (inference, ImageReward-style API);
- `forward(images, prompts)` takes image tensors `(B, 3, H, W)` in [0, 1] and stays differentiable,
  with resize / crop / normalise done in torch, so ReFL can push gradients back to the pixels.
Both paths run the same torch preprocessing, so they give the same score for the same image.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save
from torch import nn

from reward.images import ImageSource, decode_image
from runkit.hub import unreachable_advice

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CHECKPOINT_WEIGHTS = "critic.safetensors"
CHECKPOINT_CONFIG = "critic.json"

ImageLike = Union[str, os.PathLike, Image.Image]


@dataclass
class CriticConfig:
    # open_clip model name (e.g. "ViT-L-14"), a model-config JSON path, or one of the configs shipped
    # in reward/model_configs ("toy-clip", "tiny-clip").
    model_name: str = "toy-clip"
    # open_clip pretrained tag (e.g. "openai"; needs the weights in the local cache) or a local
    # checkpoint path; None starts from random weights.
    pretrained: str | None = None
    # Which parameters train (see reward/modes.py); the Social Reward paper uses the default.
    training_mode: str = "visual_upper_layers_textual_upper_layers"


def _register_shipped_configs() -> None:
    known = set(open_clip.list_models())
    for path in MODEL_CONFIG_DIR.glob("*.json"):
        if path.stem not in known:
            open_clip.add_model_config(path)


def resolve_model_name(model_name: str) -> str:
    """Model name as open_clip knows it; registers JSON configs given by path or shipped here."""
    _register_shipped_configs()
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise FileNotFoundError(f"critic model config {path} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown critic model {model_name!r}: use an open_clip model name (open_clip.list_models()), "
            f"a model-config JSON path, or one of {sorted(p.stem for p in MODEL_CONFIG_DIR.glob('*.json'))}"
        )
    return model_name


class SocialReward(nn.Module):
    """CLIP critic: score = scale * cos(text_emb, image_emb) + shift (scale 1, shift 0 until calibrated)."""

    def __init__(self, clip: nn.Module, tokenizer, config: CriticConfig):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.config = config
        pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
        size = pp.get("size", clip.visual.image_size)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pp.get("std", open_clip.OPENAI_DATASET_STD)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # Affine calibration so scores from different checkpoints share a scale (see `calibrate_`).
        self.register_buffer("score_scale", torch.tensor(1.0))
        self.register_buffer("score_shift", torch.tensor(0.0))

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ----- text -----
    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.tokenizer(list(prompts)).to(self.device)  # (B, context_length)

    def encode_text(self, prompts: Sequence[str] | torch.Tensor) -> torch.Tensor:
        tokens = prompts if isinstance(prompts, torch.Tensor) else self.tokenize(prompts)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)  # (B, D)

    # ----- images -----
    def preprocess_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, 3, S, S); differentiable."""
        images = resize_center_crop(images, self.image_size)  # (B, 3, S, S)
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The towers' parameter dtype (float32 unless the critic was cast, e.g. `.to(torch.bfloat16)`)."""
        return next(self.clip.visual.parameters()).dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        # Pixels are prepared in float32 and only then cast, so a bf16 critic sees the same crop.
        pixels = self.preprocess_tensor(images).to(self.dtype)  # (B, 3, S, S)
        return F.normalize(self.clip.encode_image(pixels).float(), dim=-1)  # (B, D)

    def set_grad_checkpointing(self, enable: bool = True) -> SocialReward:
        """Recompute both towers' transformer blocks in the backward pass instead of storing their
        activations: less memory for training (and ReFL's backward through the critic), one more forward."""
        self.clip.set_grad_checkpointing(enable)
        return self

    # ----- scores -----
    def calibrated(self, cosine: torch.Tensor) -> torch.Tensor:
        # In float32 whatever the critic's dtype: a bf16 scale would round every score.
        return cosine.float() * self.score_scale.float() + self.score_shift.float()

    def forward(self, images: torch.Tensor, prompts: Sequence[str] | torch.Tensor,
                return_embeddings: bool = False):
        """Differentiable calibrated scores, one per (image, prompt) pair: (B,).

        With `return_embeddings` it returns the normalised (image, text) embeddings instead; training
        goes through here so a DDP-wrapped critic runs one forward per step.
        """
        img = self.encode_image(images)  # (B, D)
        txt = self.encode_text(prompts)  # (B, D) or (1, D), broadcast over images
        if return_embeddings:
            return img, txt
        return self.calibrated((img * txt).sum(-1))

    @torch.no_grad()
    def calibrate_(self, cosines: torch.Tensor) -> None:
        """Map these raw cosine scores (e.g. a validation set's) to mean 0, std 1."""
        mean, std = cosines.float().mean(), cosines.float().std().clamp_min(1e-6)
        self.score_scale.fill_(1.0 / std.item())
        self.score_shift.fill_(-mean.item() / std.item())

    @torch.no_grad()
    def score(self, prompt: str, images: ImageLike | Sequence[ImageLike], batch_size: int = 64):
        """ImageReward-style: one prompt, one image -> float, or a list of images -> list of floats."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if not prompt or not str(prompt).strip():
            raise ValueError("score(): the prompt is empty; pass the text the images were generated from")
        txt = self.encode_text([prompt])  # (1, D)
        out = []
        for start in range(0, len(items), batch_size):
            batch = torch.stack([load_image_tensor(x, self.image_size)
                                 for x in items[start : start + batch_size]])
            img = self.encode_image(batch.to(self.device))  # (b, D)
            out.append(self.calibrated((img * txt).sum(-1)).float().cpu())
        scores = torch.cat(out).tolist()
        return scores[0] if single else scores

    @torch.no_grad()
    def inference_rank(self, prompt: str, images: Sequence[ImageLike], batch_size: int = 64):
        """(ranks, scores): ranks are 1-based, 1 = best, in the order the images were given."""
        scores = self.score(prompt, list(images), batch_size=batch_size)
        order = np.argsort(-np.asarray(scores), kind="stable")
        ranks = np.empty(len(scores), dtype=int)
        ranks[order] = np.arange(1, len(scores) + 1)
        return ranks.tolist(), scores

    # ----- persistence -----
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Atomically write weights (safetensors) and config (JSON) into `directory`."""
        from runkit.files import atomic_write_bytes, write_json

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / CHECKPOINT_WEIGHTS, lambda f: f.write(save(state)))
        write_json(directory / CHECKPOINT_CONFIG, {"model_name": self.config.model_name,
                                                   "pretrained": self.config.pretrained,
                                                   "training_mode": self.config.training_mode,
                                                   "image_size": self.image_size})
        return directory


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size): shortest side resized (bicubic, antialiased), centre-cropped.

    The one resize of the project: training data, file/PIL scoring and the differentiable path all
    come through here, so an image gets the same pixels whichever way it reaches the critic.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"critic expects images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return images[:, :, top : top + size, left : left + size]  # (B, 3, S, S)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image -> (3, H, W) float in [0, 1] at its own size (any mode, via `decode_image`)."""
    rgb = image if image.mode == "RGB" and "transparency" not in image.info else decode_image(image)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


def load_image_tensor(image: ImageSource, size: int, name: str | None = None) -> torch.Tensor:
    """A file, encoded bytes or PIL image -> (3, size, size) float in [0, 1]: decoded by `decode_image`,
    resized by `resize_center_crop` (torch). Raises FileNotFoundError or ImageError (a ValueError)."""
    return resize_center_crop(pil_to_tensor(decode_image(image, name))[None], size)[0]  # (3, S, S)


def is_critic_dir(path: str | os.PathLike | None) -> bool:
    return path is not None and (Path(path) / CHECKPOINT_CONFIG).is_file()


def load_critic_weights(model: SocialReward, directory: Path) -> None:
    """Load a saved critic's weights (fp16 files are upcast into the model's fp32 parameters)."""
    state = load_file(str(directory / CHECKPOINT_WEIGHTS))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape: another architecture
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ValueError(f"{directory}: checkpoint does not match model {model.config.model_name!r} "
                         f"({first[:200]})") from None
    if unexpected or missing:
        raise ValueError(f"{directory}: checkpoint does not match model {model.config.model_name!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


class _DropRootRecords(logging.Filter):
    def __init__(self, phrases: tuple[str, ...]):
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p in record.getMessage() for p in self.phrases)


# What open_clip logs on the root logger that a caller here either expects or reports itself.
RANDOM_INIT = "Model initialized randomly"  # a model built to receive weights loaded right after
FAILED_DOWNLOAD = "Failed to download weights"  # the WeightsError raised instead says it, with the fix


class quiet_open_clip_log:
    """Drop open_clip's root-logger records holding any of `phrases` for the duration."""

    def __init__(self, *phrases: str):
        self._filter = _DropRootRecords(phrases or (RANDOM_INIT,))

    def __enter__(self):
        logging.getLogger().addFilter(self._filter)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self._filter)


def uses_quick_gelu(name: str, pretrained: str | None) -> bool:
    """Whether open_clip's weights `pretrained` of `name` were trained with QuickGELU (OpenAI's are).
    open_clip 3 builds `ViT-L-14` with GELU even for its `openai` tag and only warns, which silently
    changes every embedding; the tag's own metadata says which activation its weights need."""
    if not pretrained or Path(pretrained).exists():
        return False  # random weights, or a file: the model name decides (use NAME-quickgelu for OpenAI's)
    from open_clip.pretrained import get_pretrained_cfg

    return bool(get_pretrained_cfg(name, pretrained).get("quick_gelu", False))


def create_open_clip(name: str, pretrained: str | None, path_fix: str):
    """(model, tokenizer) of open_clip architecture `name` (resolved) with weights `pretrained`: a tag
    (downloaded into the hub cache as open_clip does), a checkpoint file, or None (random). Weights that
    cannot be had raise `WeightsError` naming them and the fix (`path_fix`: where a local file goes)."""
    from reward.standard.base import WeightsError

    try:
        if pretrained:
            with quiet_open_clip_log(FAILED_DOWNLOAD):
                clip = open_clip.create_model(name, pretrained=pretrained,
                                              force_quick_gelu=uses_quick_gelu(name, pretrained))
        else:
            clip = open_clip.create_model(name, pretrained=None)
    except Exception as err:  # open_clip raises several kinds when weights are missing or not cached
        if pretrained and Path(pretrained).expanduser().exists():
            raise WeightsError(f"open_clip {name} cannot read the weights file {pretrained} "
                               f"({type(err).__name__}: {err})") from err
        if not pretrained:
            raise
        fix = unreachable_advice(f"download the checkpoint file elsewhere and {path_fix}.")
        raise WeightsError(f"could not get open_clip weights {name}:{pretrained} ({type(err).__name__}: "
                           f"{err}). {fix}") from err
    return clip, open_clip.get_tokenizer(name)


def create_critic(config: CriticConfig | None = None, **overrides) -> SocialReward:
    """The one factory for critics: real open_clip models by name, tiny ones from shipped configs.

    `pretrained` may also be a saved critic directory (e.g. the toy world's pre-trained CLIP).
    """
    config = config or CriticConfig()
    if overrides:
        config = CriticConfig(**{**config.__dict__, **overrides})
    name = resolve_model_name(config.model_name)
    pretrained = config.pretrained
    if is_critic_dir(pretrained):
        with quiet_open_clip_log():
            model = create_critic(CriticConfig(config.model_name, None, config.training_mode))
        load_critic_weights(model, Path(pretrained))
        model.config = config
        return model
    clip, tokenizer = create_open_clip(name, pretrained, "pass its path as model.pretrained")
    from reward.modes import apply_training_mode  # local import: modes imports nothing from here

    apply_training_mode(clip, config.training_mode)
    return SocialReward(clip, tokenizer, config)


def _looks_like_path(text: str) -> bool:
    """A critic source naming a path rather than an open_clip model: has a separator or starts like one."""
    return os.sep in text or "/" in text or text.startswith(("~", "."))


def check_pretrained(name: str, pretrained: str | None) -> None:
    """Refuse an open_clip `pretrained` that is neither one of `name`'s tags (open_clip's own listing, any
    case, as open_clip reads it) nor an existing checkpoint file, before anything is built."""
    if not pretrained or Path(pretrained).expanduser().is_file():
        return
    if _looks_like_path(pretrained):
        raise FileNotFoundError(f"open_clip weights file {pretrained} does not exist; pass the checkpoint "
                                f"file's path, or one of {name}'s pretrained tags")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained.lower() not in [t.lower() for t in tags]:
        known = ", ".join(tags) if tags else "none (pass a checkpoint file path)"
        raise ValueError(f"unknown open_clip pretrained tag {pretrained!r} for model {name}; its tags: "
                         f"{known}")


def check_source(path_or_name: str | os.PathLike) -> None:
    """What `load` would read, resolved without building a model: a critic folder holding its files, or an
    open_clip `name[:pretrained]` that open_clip knows. Raises FileNotFoundError / ValueError with the fix."""
    path = Path(path_or_name)
    if path.is_dir():
        if not (path / CHECKPOINT_CONFIG).is_file():
            raise FileNotFoundError(f"{path} has no {CHECKPOINT_CONFIG}; it is not a critic checkpoint "
                                    "directory")
        return
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file; pass the critic folder that holds {CHECKPOINT_CONFIG} "
                                f"and {CHECKPOINT_WEIGHTS}")
    name, _, pretrained = str(path_or_name).partition(":")
    if _looks_like_path(name) and not name.endswith(".json"):  # a model-config JSON path is a model name
        raise FileNotFoundError(f"critic folder {path} does not exist; it should hold {CHECKPOINT_CONFIG} "
                                f"and {CHECKPOINT_WEIGHTS} (the <output_dir>/critic folder reward training "
                                "writes)")
    check_pretrained(resolve_model_name(name), pretrained or None)


def load(path_or_name: str | os.PathLike, device: str | torch.device = "cpu",
         training_mode: str | None = None):
    """A saved critic directory, or an open_clip `name` / `name:pretrained` (untuned backbone)."""
    check_source(path_or_name)
    path = Path(path_or_name)
    if path.is_dir():
        meta = json.loads((path / CHECKPOINT_CONFIG).read_text())
        with quiet_open_clip_log():
            model = create_critic(CriticConfig(model_name=meta["model_name"], pretrained=None,
                                               training_mode=training_mode
                                               or meta.get("training_mode", "all")))
        load_critic_weights(model, path)
        model.config.pretrained = meta.get("pretrained")
    else:
        name, _, pretrained = str(path_or_name).partition(":")
        model = create_critic(CriticConfig(model_name=name, pretrained=pretrained or None,
                                           training_mode=training_mode or "all"))
    return model.to(device).eval()
