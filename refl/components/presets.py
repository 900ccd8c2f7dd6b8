"""Components with seeded random weights, nothing downloaded: the small presets (`"tiny"` for tests,
`"tiny-v"` in SD 2.x's style, `"tiny-sdxl"` in SDXL's layout, `"toy"` for the toy world) and the full-size
architectures whose config files ship in `refl/model_configs/` (`"sd15"`, `"sdxl"`, and the flow models
`"sd35m"`, `"sd35l"`, `"flux-dev"`).

They use the real diffusers and transformers classes, so everything downstream (LoRA, `save_lora_weights`,
`StableDiffusionPipeline` / `StableDiffusionXLPipeline`) runs unchanged on them.
"""

from __future__ import annotations

import contextlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from refl.components.container import SDComponents
from refl.components.tokenizers import (
    CLIP_VOCAB_SIZE,
    SDXL_PAD_TOKEN_2,
    build_clip_tokenizer,
    build_t5_tokenizer,
)


@dataclass
class PresetSpec:
    """A small SD architecture; channel counts must divide by `norm_num_groups`."""

    image_size: int  # pixels per side of generated images
    vae_block_out: tuple[int, ...]  # VAE channels per level; latents are image_size / 2**(len-1)
    latent_channels: int  # SD uses 4
    vae_scaling_factor: float  # latents are multiplied by this before the UNet (SD 1.x: 0.18215)
    unet_block_out: tuple[int, ...]  # UNet channels per level
    layers_per_block: int  # resnets per UNet level
    attention_heads: int  # attention heads per transformer block (diffusers' legacy attention_head_dim)
    cross_attention_dim: int  # text hidden size the UNet attends to
    norm_num_groups: int  # GroupNorm groups in the UNet (and the VAE unless vae_norm_num_groups is set)
    text_hidden: int  # CLIPTextModel width (must equal cross_attention_dim)
    text_layers: int  # CLIPTextModel transformer layers
    text_heads: int  # CLIPTextModel attention heads
    context_length: int  # tokens per prompt (SD: 77)
    # GroupNorm groups in the VAE; None = norm_num_groups. One channel per group normalises each channel's
    # mean away, and with it the colour the VAE must reconstruct.
    vae_norm_num_groups: int | None = None
    # What the UNet predicts: "epsilon" (SD 1.x, SDXL) or "v_prediction" (SD 2.x at 768 px).
    prediction_type: str = "epsilon"
    # Linear instead of 1x1-conv projections into and out of the transformer blocks (SD 2.x, SDXL).
    linear_projection: bool = False
    # SDXL: width of the second text encoder (CLIPTextModelWithProjection; its projection has the same
    # width), 0 = one text encoder (SD 1.x / 2.x). The UNet then attends to both encoders' hidden states
    # side by side (cross_attention_dim = text_hidden + text2_hidden) and SDXL's block layout is used.
    text2_hidden: int = 0
    # SDXL: width of the sinusoidal embedding of each of the 6 size/crop numbers (add_time_ids).
    time_embed_dim: int = 0


PRESETS: dict[str, PresetSpec] = {
    # Tests: 16 px images, 8x8 latents, about 0.5M UNet parameters.
    "tiny": PresetSpec(image_size=16, vae_block_out=(8, 16), latent_channels=4, vae_scaling_factor=1.0,
                       unet_block_out=(32, 64), layers_per_block=1, attention_heads=4, cross_attention_dim=32,
                       norm_num_groups=8, text_hidden=32, text_layers=2, text_heads=4, context_length=16),
    # The toy world: 32 px images, 4x8x8 latents, UNet about 3.9M parameters.
    "toy": PresetSpec(image_size=32, vae_block_out=(32, 32, 64), latent_channels=4, vae_scaling_factor=1.0,
                      unet_block_out=(64, 128), layers_per_block=1, attention_heads=8, cross_attention_dim=64,
                      norm_num_groups=32, text_hidden=64, text_layers=2, text_heads=4, context_length=16,
                      vae_norm_num_groups=8),
    # SD 2.x's kind: v-prediction and linear projections, otherwise the tiny preset.
    "tiny-v": PresetSpec(image_size=16, vae_block_out=(8, 16), latent_channels=4, vae_scaling_factor=1.0,
                         unet_block_out=(32, 64), layers_per_block=1, attention_heads=4,
                         cross_attention_dim=32,
                         norm_num_groups=8, text_hidden=32, text_layers=2, text_heads=4, context_length=16,
                         prediction_type="v_prediction", linear_projection=True),
    # SDXL's layout at tests' size: two text encoders (32 + 32 wide), pooled embedding, add_time_ids.
    "tiny-sdxl": PresetSpec(image_size=16, vae_block_out=(8, 16), latent_channels=4, vae_scaling_factor=1.0,
                            unet_block_out=(32, 64), layers_per_block=1, attention_heads=4,
                            cross_attention_dim=64,
                            norm_num_groups=8, text_hidden=32, text_layers=2, text_heads=4, context_length=16,
                            linear_projection=True, text2_hidden=32, time_embed_dim=8),
}

# Package data of refl itself (pyproject.toml), one folder above this package.
MODEL_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
# Full-size architectures shipped as diffusers/transformers config files (no weights), written from the
# released models' own config files.
# sdxl: SDXL base 1.0 (UNet about 2.6B parameters, CLIP ViT-L and OpenCLIP bigG text encoders, 1024 px).
# sd35m / sd35l: Stable Diffusion 3.5 medium (MMDiT-X, 2.2B transformer parameters) / large (8.1B); both with
# CLIP-L and CLIP-G (projected) and T5-XXL's encoder (4.7B), the 16-channel VAE, 1024 px.
# flux-dev: FLUX.1 [dev] (11.9B transformer parameters, guidance embedding), CLIP-L and T5-XXL, 1024 px.
ARCHITECTURES: dict[str, Path] = {name: MODEL_CONFIG_DIR / name
                                  for name in ("sd15", "sdxl", "sd35m", "sd35l", "flux-dev")}
# Hub ids whose architecture is one of ARCHITECTURES (for random_weights without a download).
HUB_ARCHITECTURES: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "sd35m",
    "stabilityai/stable-diffusion-3.5-large": "sd35l",
    "black-forest-labs/FLUX.1-dev": "flux-dev",
}


def _clip_text_config(hidden: int, layers: int, heads: int, context_length: int, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=context_length,
                          bos_token_id=49406, eos_token_id=49407, **kw)


def build_preset(name: str, seed: int = 0) -> SDComponents:
    """Seeded random-weight components of a small SD architecture (real diffusers classes)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    spec = PRESETS[name]
    sdxl = spec.text2_hidden > 0
    if spec.text_hidden + spec.text2_hidden != spec.cross_attention_dim:
        raise ValueError(f"preset {name}: text_hidden + text2_hidden must equal cross_attention_dim")
    if sdxl and spec.time_embed_dim < 1:
        raise ValueError(f"preset {name}: an SDXL preset needs time_embed_dim >= 1")
    levels = len(spec.unet_block_out)
    vae_levels = len(spec.vae_block_out)
    latent_size = spec.image_size // 2 ** (vae_levels - 1)
    # SDXL: no attention at the highest resolution, pooled text + 6 size numbers added to the time embedding
    if sdxl:
        blocks = {"down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
                  "up_block_types": ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
                  "addition_embed_type": "text_time", "addition_time_embed_dim": spec.time_embed_dim,
                  "projection_class_embeddings_input_dim": spec.text2_hidden + 6 * spec.time_embed_dim}
    else:
        blocks = {"down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
                  "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)}
    # Seed before each component (as diffusers' own tests do) so one changing never shifts the others.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=spec.unet_block_out,
        layers_per_block=spec.layers_per_block,
        cross_attention_dim=spec.cross_attention_dim,
        attention_head_dim=spec.attention_heads,
        norm_num_groups=spec.norm_num_groups,
        use_linear_projection=spec.linear_projection,
        **blocks,
    )
    vae_groups = spec.vae_norm_num_groups or spec.norm_num_groups
    if min(spec.vae_block_out) % vae_groups:
        vae_groups = 8
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_levels,
        up_block_types=("UpDecoderBlock2D",) * vae_levels,
        block_out_channels=spec.vae_block_out,
        latent_channels=spec.latent_channels,
        norm_num_groups=vae_groups,
        sample_size=spec.image_size,
        scaling_factor=spec.vae_scaling_factor,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_text_config(spec.text_hidden, spec.text_layers, spec.text_heads,
                                                   spec.context_length, pad_token_id=49407))
    # SD's training schedule (SD 1.x, 2.x and SDXL share it): 1000 steps, scaled-linear betas.
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                              prediction_type=spec.prediction_type)
    tokenizer = build_clip_tokenizer(spec.context_length)
    second = {}
    if sdxl:
        torch.manual_seed(seed + 3)
        second["text_encoder_2"] = CLIPTextModelWithProjection(_clip_text_config(
            spec.text2_hidden, spec.text_layers, spec.text_heads, spec.context_length, pad_token_id=0,
            projection_dim=spec.text2_hidden, hidden_act="gelu"))
        second["tokenizer_2"] = build_clip_tokenizer(spec.context_length, pad_token=SDXL_PAD_TOKEN_2)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source=f"preset:{name}",
                        family="sdxl" if sdxl else "sd", **second)


def build_from_configs(unet: dict, vae: dict, text_encoder: dict, scheduler: dict, seed: int, source: str,
                       tokenizer=None, text_encoder_2: dict | None = None, tokenizer_2=None) -> SDComponents:
    """Seeded random-weight components from config dicts (diffusers' and transformers' own formats);
    `text_encoder_2` (SDXL) builds a CLIPTextModelWithProjection too."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    strip = {"architectures", "_class_name", "_diffusers_version", "_name_or_path", "transformers_version"}
    torch.manual_seed(seed)
    unet_model = UNet2DConditionModel.from_config({k: v for k, v in unet.items() if k not in strip})
    torch.manual_seed(seed + 1)
    vae_model = AutoencoderKL.from_config({k: v for k, v in vae.items() if k not in strip})
    torch.manual_seed(seed + 2)
    text_model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_encoder.items() if k not in strip}))
    sched = DDPMScheduler.from_config({k: v for k, v in scheduler.items() if k not in strip})
    tokenizer = tokenizer or build_clip_tokenizer(text_encoder.get("max_position_embeddings", 77))
    second = {}
    if text_encoder_2 is not None:
        torch.manual_seed(seed + 3)
        second["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig(**{k: v for k, v in text_encoder_2.items() if k not in strip}))
        second["tokenizer_2"] = tokenizer_2 or build_clip_tokenizer(
            text_encoder_2.get("max_position_embeddings", 77), pad_token=SDXL_PAD_TOKEN_2)
    return SDComponents(unet_model, vae_model, text_model, tokenizer, sched, source=source,
                        family="sdxl" if text_encoder_2 is not None else "sd", **second)


def _config(path: Path) -> dict:
    strip = {"architectures", "_class_name", "_diffusers_version", "_name_or_path", "transformers_version"}
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in strip}


def build_flow_from_configs(root: Path, seed: int, source: str,
                            transformer_overrides: dict | None = None) -> SDComponents:
    """Seeded random-weight SD 3 / FLUX components from a folder of config files (transformer.json, vae.json,
    text_encoder*.json, scheduler.json), in the default dtype and on the default device;
    `transformer_overrides` replaces keys of transformer.json (a shallower copy, for counting)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}[
        json.loads((root / "transformer.json").read_text())["_class_name"]]
    torch.manual_seed(seed)
    transformer = (SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel).from_config(
        {**_config(root / "transformer.json"), **(transformer_overrides or {})})
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL.from_config(_config(root / "vae.json"))
    encoders = {}
    for i, name in enumerate(("text_encoder", "text_encoder_2") if family == "sd3" else ("text_encoder",)):
        torch.manual_seed(seed + 2 + i)
        raw = json.loads((root / f"{name}.json").read_text())
        cls = CLIPTextModelWithProjection if raw["architectures"] == ["CLIPTextModelWithProjection"] else \
            CLIPTextModel
        encoders[name] = cls(CLIPTextConfig(**_config(root / f"{name}.json")))
    t5_name = "text_encoder_3" if family == "sd3" else "text_encoder_2"
    torch.manual_seed(seed + 4)
    encoders[t5_name] = T5EncoderModel(T5Config(**_config(root / f"{t5_name}.json")))
    for encoder in encoders.values():
        encoder.eval()  # as from_pretrained leaves them: T5's dropout off
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_config(root / "scheduler.json"))
    tokenizers = {"tokenizer": build_clip_tokenizer(77)}
    if family == "sd3":
        tokenizers.update(tokenizer_2=build_clip_tokenizer(77, pad_token=SDXL_PAD_TOKEN_2),
                          tokenizer_3=build_t5_tokenizer())
    else:
        tokenizers["tokenizer_2"] = build_t5_tokenizer()
    return SDComponents(None, vae, encoders.pop("text_encoder"), tokenizers.pop("tokenizer"), scheduler,
                        transformer=transformer, family=family, source=source, **encoders, **tokenizers)


@contextmanager
def _building(device: str | torch.device | None, dtype: torch.dtype | None):
    """Parameters made on `device` in `dtype` as they are built (a full-size model never exists in fp32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def build_architecture(name: str, seed: int = 0, device: str | torch.device | None = None,
                       dtype: torch.dtype | None = None, transformer_overrides: dict | None = None
                       ) -> SDComponents:
    """A full-size architecture of ARCHITECTURES with seeded random weights (nothing downloaded), built on
    `device` in `dtype` (default: the CPU, fp32); `device="meta"` builds shapes only, for counting.
    `transformer_overrides`: keys of a flow model's transformer config replaced (e.g. fewer blocks)."""
    root = ARCHITECTURES[name]
    with _building(device, dtype):
        if (root / "transformer.json").is_file():
            components = build_flow_from_configs(root, seed, source=f"preset:{name}",
                                                 transformer_overrides=transformer_overrides)
        else:
            parts = ["unet", "vae", "text_encoder", "scheduler"] + (
                ["text_encoder_2"] if (root / "text_encoder_2.json").is_file() else [])
            configs = {part: json.loads((root / f"{part}.json").read_text()) for part in parts}
            components = build_from_configs(**configs, seed=seed, source=f"preset:{name}")
    # buffers some constructors make from numpy arrays land on the CPU in fp32 whatever the defaults
    return components.to(device, dtype) if device is not None or dtype is not None else components
