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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsError(ValueError):
    """A reward model's weights are missing or do not match; the message names the path and the layout."""


# ----------------------------------------------------------------------------- preprocessing
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
        raise ValueError(f"reward models take images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
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


# ----------------------------------------------------------------------------- the interface
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


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


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
        img = _normalise(self.clip.encode_image(pixels))  # (B, D)
        txt = _normalise(self.clip.encode_text(self.tokenizer(prompts).to(self.device)))  # (B, D)
        return self.scale * (img * txt).sum(-1)  # (B,)


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
        emb = _normalise(self.clip.encode_image(pixels))  # (B, D)
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
        img = _normalise(m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output))  # (B, D)
        ids = self.tokenizer(prompts).to(self.device)  # (B, L)
        txt = _normalise(m.text_projection(m.text_model(input_ids=ids).pooler_output))  # (B, D)
        return m.logit_scale.exp().float() * (img * txt).sum(-1)  # (B,)


# ----------------------------------------------------------------------------- files and the hub
def _hub_like(argument: str) -> bool:
    """'owner/name' with no file suffix and nothing on disk: a hub repository id."""
    parts = argument.split("/")
    weights_suffix = Path(argument).suffix.lower() in {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".json"}
    return len(parts) == 2 and all(parts) and not argument.startswith((".", "~")) and not weights_suffix


def _hub_download(repo: str, filename: str, kind: str, layout: str) -> Path:
    """One file of a hub repository through huggingface_hub's cache (HF_HUB_OFFLINE: cache only)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as err:  # offline, missing from the cache, no network, unknown repo: all the same advice
        raise WeightsError(f"{kind}: could not get {filename} from the hub repository {repo} ({type(err).__name__}: "
                           f"{err}). Offline, download it elsewhere and pass its local path. Expected: {layout}") from err


def _find_file(argument: str, filename: str, kind: str, layout: str, hub_repo: str) -> Path:
    """A weights file: the argument itself, `filename` inside the argument's folder, or from the hub."""
    path = Path(argument).expanduser() if argument else None
    if path is not None and path.is_file():
        return path
    if path is not None and path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise WeightsError(f"{kind}: {path} has no {filename}. Expected: {layout}")
    if not argument or _hub_like(argument):
        return _hub_download(argument or hub_repo, filename, kind, layout)
    raise WeightsError(f"{kind}: {path} does not exist. Expected: {layout}")


def _torch_load(path: Path, kind: str, layout: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{kind}: {path} cannot be read as a torch checkpoint ({err}). Expected: {layout}") from err


def _load_exact(module: nn.Module, state: dict, path: Path, kind: str, layout: str, ignore: tuple[str, ...] = ()):
    """load_state_dict that names the file, the missing and the unexpected keys (ignoring `ignore` prefixes)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{kind}: {path} does not hold a state dict of tensors. Expected: {layout}")
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{kind}: {path} does not match the model: {len(missing)} missing key(s) {missing[:4]}, "
                           f"{len(unexpected)} unexpected key(s) {unexpected[:4]}. Expected: {layout}")


def _open_clip_model(name: str, pretrained: str | None):
    """(model, tokenizer) of an open_clip architecture; shipped tiny configs and JSON paths work too."""
    import open_clip

    from reward.model import _quiet_random_init_warning, resolve_model_name, uses_quick_gelu

    name = resolve_model_name(name)
    try:
        if pretrained:
            model = open_clip.create_model(name, pretrained=pretrained,
                                           force_quick_gelu=uses_quick_gelu(name, pretrained))
        else:
            with _quiet_random_init_warning():
                model = open_clip.create_model(name, pretrained=None)
    except Exception as err:  # open_clip raises several kinds when weights are not cached
        raise WeightsError(f"could not load open_clip {name} weights {pretrained!r} ({type(err).__name__}: {err}). "
                           "Offline, put the checkpoint file on disk and pass NAME:PATH.") from err
    return model, open_clip.get_tokenizer(name)


def _open_clip_transform(clip: nn.Module, **changes) -> ImageTransform:
    """open_clip's own evaluation transform (PIL resize, torchvision centre crop) as an ImageTransform."""
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", clip.visual.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    modes = {"shortest": "crop", "squash": "squash"}
    resize_mode = pp.get("resize_mode", "shortest")
    if resize_mode not in modes:
        raise ValueError(f"open_clip resize_mode {resize_mode!r} is not supported here; use one of {sorted(modes)}")
    fields = {"size": size, "mean": tuple(pp.get("mean", OPENAI_MEAN)), "std": tuple(pp.get("std", OPENAI_STD)),
              "mode": modes[resize_mode], "interpolation": pp.get("interpolation", "bicubic")}
    fields.update(changes)
    return ImageTransform(**fields)


# ----------------------------------------------------------------------------- loaders
LAYOUTS = {
    "clipscore": "an open_clip NAME[:PRETRAINED] (pretrained: an open_clip tag whose weights are cached, "
                 "or a checkpoint file path; OpenAI weights from a file need the -quickgelu name), e.g. "
                 "ViT-L-14-quickgelu:openai",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth (or a folder holding it): a torch state dict with keys "
                 "layers.{0,2,4,6,7}.{weight,bias} for Linear 768-1024-128-64-16-1; the image embedding comes "
                 "from open_clip ViT-L-14-quickgelu:openai (option backbone=NAME:PRETRAINED)",
    "pickscore": "a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin), e.g. "
                 "a snapshot of yuvalkirstain/PickScore_v1",
    "hpsv2": "HPS_v2_compressed.pt (or a folder holding it): a torch file holding {'state_dict': open_clip "
             "ViT-H-14 state dict}, from the hub repository xswu/HPSv2",
    "hpsv21": "HPS_v2.1_compressed.pt (or a folder holding it): a torch file holding {'state_dict': open_clip "
              "ViT-H-14 state dict}, from the hub repository xswu/HPSv2",
    "imagereward": "a folder with ImageReward.pt (torch state dict: blip.visual_encoder.*, blip.text_encoder.*, "
                   "mlp.layers.*) and med_config.json (the BERT config), from the hub repository THUDM/ImageReward; "
                   "plus the bert-base-uncased tokenizer (vocab.txt in the folder, or option tokenizer=PATH_OR_HUB_ID)",
}


def load_clipscore(argument: str, options: dict) -> StandardReward:
    name, _, pretrained = (argument or "ViT-L-14-quickgelu:openai").partition(":")
    clip, tokenizer = _open_clip_model(name, pretrained or None)
    model = OpenClipCosine("clipscore", clip, tokenizer, _open_clip_transform(clip), scale=100.0)
    model.source = argument or "ViT-L-14-quickgelu:openai"
    return model


def load_aesthetic(argument: str, options: dict) -> StandardReward:
    layout = LAYOUTS["aesthetic"]
    path = _find_file(argument, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic", layout, hub_repo="")
    # The predictor was trained on OpenAI CLIP ViT-L/14 embeddings (QuickGELU), which open_clip holds as
    # ViT-L-14-quickgelu:openai.
    name, _, pretrained = options.get("backbone", "ViT-L-14-quickgelu:openai").partition(":")
    clip, _ = _open_clip_model(name, pretrained or None)
    mlp = ScoreMLP(clip.visual.output_dim)
    _load_exact(mlp, _torch_load(path, "aesthetic", layout), path, "aesthetic", layout)
    model = AestheticScore(clip, mlp, _open_clip_transform(clip))
    model.source = str(path)
    return model


def _load_hps(kind: str, filename: str):
    def loader(argument: str, options: dict) -> StandardReward:
        layout = LAYOUTS[kind]
        path = _find_file(argument, filename, kind, layout, hub_repo="xswu/HPSv2")
        blob = _torch_load(path, kind, layout)
        if not isinstance(blob, dict) or "state_dict" not in blob:
            keys = list(blob)[:4] if isinstance(blob, dict) else type(blob).__name__
            raise WeightsError(f"{kind}: {path} has no 'state_dict' entry (found {keys}). Expected: {layout}")
        clip, tokenizer = _open_clip_model(options.get("model", "ViT-H-14"), None)
        _load_exact(clip, blob["state_dict"], path, kind, layout)
        # HPS v2's evaluation transform (its open_clip fork, light_augmentation=True): ToTensor, then the
        # longest side to S on the float tensor and black padding to a square; no crop.
        transform = _open_clip_transform(clip, mode="pad", clamp=False)
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
    elif not _hub_like(source):
        raise WeightsError(f"pickscore: {path} does not exist. Expected: {layout}")
    return source, path


def load_pickscore(argument: str, options: dict) -> StandardReward:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPModel

    layout = LAYOUTS["pickscore"]
    source, path = _pickscore_source(argument)
    try:
        # fp32 like every other kind here (transformers 5 would keep the file's dtype); load_standard casts.
        model, info = CLIPModel.from_pretrained(str(path) if path.exists() else source, output_loading_info=True,
                                                dtype=torch.float32)
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
    # Its processor (laion/CLIP-ViT-H-14-laion2B-s32B-b79K): PIL bicubic shortest side, transformers' centre crop.
    transform = ImageTransform(size=vision.image_size, crop_offset="floor")
    reward = PickScore(model, tokenizer, transform)
    reward.source = source
    return reward


def load_imagereward(argument: str, options: dict) -> StandardReward:
    from reward.imagereward import load_imagereward as load

    return load(argument, options)


def _check_open_clip(name_and_pretrained: str) -> None:
    """An open_clip NAME[:PRETRAINED] that open_clip knows, its weights file present when it is a path."""
    from reward.model import check_pretrained, resolve_model_name

    name, _, pretrained = name_and_pretrained.partition(":")
    check_pretrained(resolve_model_name(name), pretrained or None)


def check_clipscore(argument: str, options: dict) -> None:
    _check_open_clip(argument or "ViT-L-14-quickgelu:openai")


def check_aesthetic(argument: str, options: dict) -> None:
    _find_file(argument, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic", LAYOUTS["aesthetic"], hub_repo="")
    _check_open_clip(options.get("backbone", "ViT-L-14-quickgelu:openai"))


def check_pickscore(argument: str, options: dict) -> None:
    _pickscore_source(argument)


def _check_hps(kind: str, filename: str):
    def check(argument: str, options: dict) -> None:
        _find_file(argument, filename, kind, LAYOUTS[kind], hub_repo="xswu/HPSv2")
        _check_open_clip(options.get("model", "ViT-H-14"))

    return check


def check_imagereward(argument: str, options: dict) -> None:
    from reward.imagereward import imagereward_files

    imagereward_files(argument)


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
    "hpsv2": StandardKind(_load_hps("hpsv2", "HPS_v2_compressed.pt"), _check_hps("hpsv2", "HPS_v2_compressed.pt"),
                          ("model",)),
    "hpsv21": StandardKind(_load_hps("hpsv21", "HPS_v2.1_compressed.pt"),
                           _check_hps("hpsv21", "HPS_v2.1_compressed.pt"), ("model",)),
    "imagereward": StandardKind(load_imagereward, check_imagereward, ("tokenizer",)),
}


def parse_standard_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """`kind:ARGUMENT[,name=value...]` -> (kind, argument, options); the argument may contain ':'."""
    kind, _, rest = spec.partition(":")
    if kind not in STANDARD_KINDS:
        raise ValueError(f"unknown standard reward {kind!r} in {spec!r}; choose one of {sorted(STANDARD_KINDS)}")
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
            raise ValueError(f"unknown model {kind!r}: neither a standard reward kind ({', '.join(STANDARD_KINDS)}) "
                             "nor an open_clip model name (open_clip.list_models()); check the spelling") from err
    check_source(spec)


def load_standard(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> StandardReward:
    """The one factory: a spec (`hpsv2:weights/HPS_v2_compressed.pt`) -> a frozen model in eval mode."""
    kind, argument, options = parse_standard_spec(spec)
    model = STANDARD_KINDS[kind].loader(argument, options)
    model.requires_grad_(False).eval()
    logger.info("standard reward %s loaded from %s", kind, model.source or argument)
    return model.to(device=device, dtype=dtype)
