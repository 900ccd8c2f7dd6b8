"""ImageReward v1.0 on transformers' BLIP classes, reading the released `ImageReward.pt` as it is.

ImageReward is BLIP: a ViT image encoder (ViT-L/16 at 224 px for v1.0) whose patch tokens a BERT text
encoder attends to through cross-attention; an MLP on the text encoder's first ([CLS]) token gives
the reward, normalised with the mean and std of its test set. transformers' `BlipVisionModel` and
`BlipTextModel` are ports of exactly these two networks (BLIP's timm-style `vit.py` and its `med.py`
BERT), so only the vision key names need translating; the text keys are identical.

Not the `image-reward` package: it pins 2023 transformers and timm and builds BLIP from its own copy
of `med.py`, which does not import cleanly next to transformers 5.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from reward.standard.base import ImageTransform, ScoreMLP, StandardReward, WeightsError
from reward.standard.files import LAYOUTS, find_file, hub_like, load_exact, torch_load

# Published normalisation of ImageReward v1.0's raw MLP output (mean and std on its test set).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# Prompts are padded / truncated to this many BERT tokens, as ImageReward's scoring code does.
IMAGEREWARD_MAX_LENGTH = 35

# BLIP vit.py name -> BlipVisionModel name (regex on the key after "blip.visual_encoder.").
_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
# Keys of the release that scoring never reads: BLIP's contrastive projections and BERT's position-id buffer.
_IGNORED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _rename_vision(key: str) -> str:
    for pattern, repl in _VISION_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def split_release_state(state: dict, path: Path) -> tuple[dict, dict, dict]:
    """The released flat state dict -> (vision, text, mlp) state dicts under transformers / our names."""
    layout = LAYOUTS["imagereward"]
    vision, text, mlp, other = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(_IGNORED):
            continue
        if key.startswith("blip.visual_encoder."):
            vision[_rename_vision(key[len("blip.visual_encoder."):])] = value
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        else:
            other.append(key)
    if other or not vision or not text or not mlp:
        raise WeightsError(f"imagereward: {path} does not look like ImageReward.pt: unexpected keys "
                           f"{other[:4]}, {len(vision)} vision / {len(text)} text / {len(mlp)} MLP keys. "
                           f"Expected: {layout}")
    return vision, text, mlp


def vision_config_from_state(vision: dict, path: Path):
    """BLIP's ViT shape from the weights themselves (BLIP's ViT-B and ViT-L both use 64-dim heads)."""
    from transformers import BlipVisionConfig

    try:
        width = vision["embeddings.class_embedding"].shape[-1]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        tokens = vision["embeddings.position_embedding"].shape[1] - 1
        hidden = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise WeightsError(f"imagereward: {path} lacks {err} (after renaming). Expected: "
                           f"{LAYOUTS['imagereward']}") from err
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    side = math.isqrt(tokens)
    return BlipVisionConfig(hidden_size=width, intermediate_size=hidden, num_hidden_layers=depth,
                            num_attention_heads=max(1, width // 64), image_size=side * patch,
                            patch_size=patch,
                            # timm's ViT: LayerNorm eps 1e-6, exact GELU
                            layer_norm_eps=1e-6, hidden_act="gelu")


def text_config_from_med(med_path: Path, encoder_width: int):
    """BLIP's med_config.json (a BertConfig) -> BlipTextConfig; cross-attention width = the ViT's, as BLIP
    sets it."""
    from transformers import BlipTextConfig

    try:
        med = json.loads(med_path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"imagereward: {med_path} is not a readable JSON config ({err})") from err
    keys = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id"]
    missing = [k for k in keys if k not in med]
    if missing:
        raise WeightsError(f"imagereward: {med_path} lacks {missing}; it should be BLIP's med_config.json")
    # is_decoder=True only makes transformers build the cross-attention layers; `forward` runs with its
    # default is_decoder=False, i.e. bidirectional self-attention: BLIP's text *encoder* mode.
    # tiny vocabularies
    special = {} if med["vocab_size"] > 30522 else {"bos_token_id": None, "sep_token_id": None}
    return BlipTextConfig(**{k: med[k] for k in keys}, encoder_hidden_size=encoder_width, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **special)


class ImageReward(StandardReward):
    """ImageReward v1.0: (mlp(BERT [CLS] attending to the ViT tokens) - mean) / std."""

    kind = "imagereward"

    def __init__(self, vision, text, mlp: ScoreMLP, tokenizer, transform: ImageTransform):
        super().__init__(transform)
        self.vision = vision
        self.text = text
        self.mlp = mlp
        self.tokenizer = tokenizer

    def score(self, pixels, prompts):
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + N, Dv), post-LayerNorm
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt").to(self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)  # (B, 1 + N)
        hidden = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                           encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_atts).last_hidden_state
        raw = self.mlp(hidden[:, 0, :])[:, 0]  # (B,), from the [CLS] token
        return (raw.float() - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def _bert_tokenizer(folder: Path | None, option: str | None):
    """bert-base-uncased's tokenizer (what BLIP's init_tokenizer loads; its two added tokens never occur in
    a prompt, so plain BERT ids are BLIP's): vocab.txt in the weights folder, the `tokenizer=` option, or the
    hub."""
    from transformers import BertTokenizer

    source = option or (str(folder) if folder is not None and (folder / "vocab.txt").is_file() else
                        "google-bert/bert-base-uncased")
    try:
        return BertTokenizer.from_pretrained(source)
    except Exception as err:
        raise WeightsError(f"imagereward: no BERT tokenizer at {source} ({type(err).__name__}: {err}). Put "
                           "bert-base-uncased's vocab.txt beside ImageReward.pt or pass "
                           "tokenizer=PATH.") from err


def imagereward_files(argument: str) -> tuple[Path, Path, Path | None]:
    """(ImageReward.pt, med_config.json, folder holding a tokenizer or None) of a spec's argument: a local
    folder or file, or a hub id (empty: THUDM/ImageReward), fetched like ImageReward.load fetches it."""
    layout = LAYOUTS["imagereward"]
    local = Path(argument).expanduser() if argument else None
    if local is not None and local.exists():
        weights = find_file(argument, "ImageReward.pt", "imagereward", layout, hub_repo="")
        med = weights.parent / "med_config.json"
        if not med.is_file():
            raise WeightsError(f"imagereward: {weights.parent} has no med_config.json. Expected: {layout}")
        return weights, med, weights.parent
    repo = argument if argument and hub_like(argument) else "THUDM/ImageReward"
    weights = find_file(argument, "ImageReward.pt", "imagereward", layout, hub_repo=repo)
    return weights, find_file(argument, "med_config.json", "imagereward", layout, hub_repo=repo), None


def load_imagereward(argument: str, options: dict) -> ImageReward:
    layout = LAYOUTS["imagereward"]
    weights, med, tokenizer_folder = imagereward_files(argument)
    from transformers import BlipTextModel, BlipVisionModel

    state = torch_load(weights, "imagereward", layout)
    if not isinstance(state, dict):
        raise WeightsError(f"imagereward: {weights} holds a {type(state).__name__}, not a state dict. "
                           f"Expected: {layout}")
    vision_state, text_state, mlp_state = split_release_state(state, weights)
    vision_cfg = vision_config_from_state(vision_state, weights)
    text_cfg = text_config_from_med(med, vision_cfg.hidden_size)
    vision = BlipVisionModel(vision_cfg)
    text = BlipTextModel(text_cfg, add_pooling_layer=False)
    mlp = ScoreMLP(text_cfg.hidden_size)
    load_exact(vision, vision_state, weights, "imagereward", layout)
    load_exact(text, text_state, weights, "imagereward", layout)
    load_exact(mlp, mlp_state, weights, "imagereward", layout)
    tokenizer = _bert_tokenizer(tokenizer_folder, options.get("tokenizer"))
    # ImageReward's _transform: Resize(S, bicubic) + CenterCrop(S) on PIL images, OpenAI CLIP mean/std.
    model = ImageReward(vision, text, mlp, tokenizer, ImageTransform(size=vision_cfg.image_size))
    model.source = str(weights)
    return model


def check_imagereward(argument: str, options: dict) -> None:
    imagereward_files(argument)
