"""The CLIP-based standard reward models: CLIP score and HPS v2 / v2.1 (open_clip cosines), the LAION
aesthetic predictor (an MLP on an open_clip image embedding) and PickScore (a transformers CLIPModel),
each with its loader and its check (which resolves the files without loading weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reward.standard.base import (
    OPENAI_MEAN,
    OPENAI_STD,
    ImageTransform,
    ScoreMLP,
    StandardReward,
    WeightsError,
    unit,
)
from reward.standard.files import LAYOUTS, find_file, hub_like, load_exact, torch_load


class OpenClipCosine(StandardReward):
    """scale * cos(text, image) of an open_clip model: CLIP score (scale 100) and HPS v2 (scale 1)."""

    def __init__(self, kind: str, clip: nn.Module, tokenizer, transform: ImageTransform, scale: float):
        super().__init__(transform)
        self.kind = kind
        self.clip = clip
        self.tokenizer = tokenizer
        self.scale = scale

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.clip.set_grad_checkpointing(enable)
        return True

    def score(self, pixels, prompts):
        img = unit(self.clip.encode_image(pixels))  # (B, D)
        txt = unit(self.clip.encode_text(self.tokenizer(prompts).to(self.device)))  # (B, D)
        return self.scale * (img * txt).sum(-1)  # (B,)


class AestheticScore(StandardReward):
    """LAION aesthetic predictor v2: MLP on the L2-normalised CLIP image embedding; ignores the prompt."""

    kind = "aesthetic"

    def __init__(self, clip: nn.Module, mlp: ScoreMLP, transform: ImageTransform):
        super().__init__(transform)
        self.clip = clip
        self.mlp = mlp

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.clip.set_grad_checkpointing(enable)
        return True

    def score(self, pixels, prompts):
        emb = unit(self.clip.encode_image(pixels))  # (B, D)
        return self.mlp(emb.to(self.dtype))[:, 0]  # (B,)


class PickScore(StandardReward):
    """PickScore: a transformers CLIPModel; logit_scale.exp() * cos(text, image)."""

    kind = "pickscore"

    def __init__(self, model: nn.Module, tokenizer, transform: ImageTransform):
        super().__init__(transform)
        self.model = model
        self.tokenizer = tokenizer

    def score(self, pixels, prompts):
        m = self.model
        # The projections directly: get_*_features return ModelOutputs in transformers 5, tensors before.
        img = unit(m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output))  # (B, D)
        ids = self.tokenizer(prompts).to(self.device)  # (B, L)
        txt = unit(m.text_projection(m.text_model(input_ids=ids).pooler_output))  # (B, D)
        return m.logit_scale.exp().float() * (img * txt).sum(-1)  # (B,)


def open_clip_model(name: str, pretrained: str | None):
    """(model, tokenizer) of an open_clip architecture; shipped tiny configs and JSON paths work too."""
    from reward.model import create_open_clip, quiet_open_clip_log, resolve_model_name

    name = resolve_model_name(name)
    if pretrained:
        return create_open_clip(name, pretrained, "pass NAME:PATH as the spec")
    with quiet_open_clip_log():  # random weights asked for: the "initialized randomly" warning says nothing
        return create_open_clip(name, None, "pass NAME:PATH as the spec")


def open_clip_transform(clip: nn.Module, **changes) -> ImageTransform:
    """open_clip's own evaluation transform (PIL resize, torchvision centre crop) as an ImageTransform."""
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", clip.visual.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    modes = {"shortest": "crop", "squash": "squash"}
    resize_mode = pp.get("resize_mode", "shortest")
    if resize_mode not in modes:
        raise ValueError(f"open_clip resize_mode {resize_mode!r} is not supported here; use one of "
                         f"{sorted(modes)}")
    fields = {"size": size, "mean": tuple(pp.get("mean", OPENAI_MEAN)),
              "std": tuple(pp.get("std", OPENAI_STD)),
              "mode": modes[resize_mode], "interpolation": pp.get("interpolation", "bicubic")}
    fields.update(changes)
    return ImageTransform(**fields)


def load_clipscore(argument: str, options: dict) -> StandardReward:
    name, _, pretrained = (argument or "ViT-L-14-quickgelu:openai").partition(":")
    clip, tokenizer = open_clip_model(name, pretrained or None)
    model = OpenClipCosine("clipscore", clip, tokenizer, open_clip_transform(clip), scale=100.0)
    model.source = argument or "ViT-L-14-quickgelu:openai"
    return model


def load_aesthetic(argument: str, options: dict) -> StandardReward:
    layout = LAYOUTS["aesthetic"]
    path = find_file(argument, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic", layout, hub_repo="")
    # The predictor was trained on OpenAI CLIP ViT-L/14 embeddings (QuickGELU), which open_clip holds as
    # ViT-L-14-quickgelu:openai.
    name, _, pretrained = options.get("backbone", "ViT-L-14-quickgelu:openai").partition(":")
    clip, _ = open_clip_model(name, pretrained or None)
    mlp = ScoreMLP(clip.visual.output_dim)
    load_exact(mlp, torch_load(path, "aesthetic", layout), path, "aesthetic", layout)
    model = AestheticScore(clip, mlp, open_clip_transform(clip))
    model.source = str(path)
    return model


def load_hps(kind: str, filename: str):
    def loader(argument: str, options: dict) -> StandardReward:
        layout = LAYOUTS[kind]
        path = find_file(argument, filename, kind, layout, hub_repo="xswu/HPSv2")
        blob = torch_load(path, kind, layout)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            keys = list(blob)[:4] if isinstance(blob, dict) else type(blob).__name__
            raise WeightsError(f"{kind}: {path} has no 'state_dict' entry (found {keys}). Expected: {layout}")
        clip, tokenizer = open_clip_model(options.get("model", "ViT-H-14"), None)
        load_exact(clip, blob["state_dict"], path, kind, layout)
        # HPS v2's evaluation transform (its open_clip fork, light_augmentation=True): ToTensor, then the
        # longest side to S on the float tensor and black padding to a square; no crop.
        transform = open_clip_transform(clip, mode="pad", clamp=False)
        model = OpenClipCosine(kind, clip, tokenizer, transform, scale=1.0)
        model.source = str(path)
        return model

    return loader


def _pickscore_source(argument: str) -> tuple[str, Path]:
    """(source, local path) of a PickScore spec: a CLIPModel folder with its config.json, or a hub id."""
    layout = LAYOUTS["pickscore"]
    source = argument or "yuvalkirstain/PickScore_v1"
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise WeightsError(f"pickscore: {path} has no config.json. Expected: {layout}")
    elif not hub_like(source):
        raise WeightsError(f"pickscore: {path} does not exist. Expected: {layout}")
    return source, path


def load_pickscore(argument: str, options: dict) -> StandardReward:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPModel

    layout = LAYOUTS["pickscore"]
    source, path = _pickscore_source(argument)
    try:
        # fp32 like every other kind here (transformers 5 would keep the file's dtype); load_standard casts.
        model, info = CLIPModel.from_pretrained(str(path) if path.exists() else source,
                                                output_loading_info=True, dtype=torch.float32)
    except Exception as err:
        raise WeightsError(f"pickscore: cannot load {source} as a CLIPModel ({type(err).__name__}: {err}). "
                           f"Expected: {layout}") from err
    # transformers fills missing weights with random ones and only warns: refuse instead.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    bad = missing + list(info.get("mismatched_keys", []))
    if bad or info.get("unexpected_keys"):
        raise WeightsError(f"pickscore: {source} does not match its config: missing {bad[:4]}, unexpected "
                           f"{list(info.get('unexpected_keys', []))[:4]}. Expected: {layout}")
    # The CLIP-H tokenizer PickScore was trained with gives the ids of open_clip's BPE tokenizer (which
    # ships inside open_clip, so nothing is downloaded); padding after the end token differs (0 vs
    # pad id) but CLIP's causal text model never lets a token see later positions.
    tokenizer = SimpleTokenizer(context_length=model.config.text_config.max_position_embeddings)
    vision = model.config.vision_config
    # Its processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): PIL bicubic shortest side, transformers' centre
    # crop.
    transform = ImageTransform(size=vision.image_size, crop_offset="floor")
    reward = PickScore(model, tokenizer, transform)
    reward.source = source
    return reward


def _check_open_clip(name_and_pretrained: str) -> None:
    """An open_clip NAME[:PRETRAINED] that open_clip knows, its weights file present when it is a path."""
    from reward.model import check_pretrained, resolve_model_name

    name, _, pretrained = name_and_pretrained.partition(":")
    check_pretrained(resolve_model_name(name), pretrained or None)


def check_clipscore(argument: str, options: dict) -> None:
    _check_open_clip(argument or "ViT-L-14-quickgelu:openai")


def check_aesthetic(argument: str, options: dict) -> None:
    find_file(argument, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic", LAYOUTS["aesthetic"], hub_repo="")
    _check_open_clip(options.get("backbone", "ViT-L-14-quickgelu:openai"))


def check_pickscore(argument: str, options: dict) -> None:
    _pickscore_source(argument)


def check_hps(kind: str, filename: str):
    def check(argument: str, options: dict) -> None:
        find_file(argument, filename, kind, LAYOUTS[kind], hub_repo="xswu/HPSv2")
        _check_open_clip(options.get("model", "ViT-H-14"))

    return check


