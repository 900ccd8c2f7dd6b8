"""One factory for Stable Diffusion components: SD 1.x / 2.x and SDXL.

`load_components(ModelConfig(name=...))` returns UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer and the training (DDPM) scheduler, and for SDXL also its second text encoder
(CLIPTextModelWithProjection, whose projected end-of-text embedding is SDXL's pooled text embedding) and
second tokenizer, from
- a diffusers directory (`model_index.json` + subfolders; SDXL when it has `text_encoder_2/`),
- a hub model id (downloaded and cached as diffusers does; `HF_HUB_OFFLINE=1` uses the cache only),
- or a named preset built with seeded random weights: `"tiny"` for tests, `"tiny-v"` (SD 2.x style:
  v-prediction, linear attention projections), `"tiny-sdxl"` (SDXL's layout: two text encoders, pooled
  embedding and size conditioning), `"toy"` for the toy world, and the full-size architectures `"sd15"`
  and `"sdxl"` from the configs shipped in `refl/model_configs/`.
  Presets use the real diffusers classes, so everything downstream (LoRA, `save_lora_weights`,
  `StableDiffusionPipeline` / `StableDiffusionXLPipeline`) runs unchanged on them.
`ModelConfig.random_weights` builds any of these architectures without loading weights (a dry run of
a real config, offline): a directory from its own config files, a known hub id from `sd15` / `sdxl`.
`ModelConfig.vae` swaps in another VAE (e.g. an fp16-safe SDXL VAE).

The tokenizers of a preset are real `CLIPTokenizer`s rebuilt offline from the BPE vocabulary that
open_clip ships, so they give the same ids as OpenAI CLIP (and open_clip) do. SDXL's second tokenizer
pads with "!" (id 0) instead of <|endoftext|>, and so does the SDXL presets' one.

Half precision: SDXL's VAE overflows in fp16 (its decoder's activations pass fp16's 65504). Under fp16
the VAE therefore stays in fp32 and runs outside autocast (`SDComponents.vae_autocast`) unless its config
says `force_upcast: false`, which is how fp16-safe VAEs mark themselves; bf16 has fp32's range and casts
the VAE like everything else.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runkit.files import atomic_dir, atomic_write_text
from runkit.hub import unreachable_advice

logger = logging.getLogger(__name__)

# OpenAI CLIP's vocabulary: 256 byte tokens, the same with "</w>", 48,894 merges, 2 specials.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = 49152 - 256 - 2


@dataclass
class ModelConfig:
    # "tiny" / "toy" / "sd15" (presets with seeded random weights), a diffusers directory, or a hub
    # model id (downloaded on first use and cached; HF_HUB_OFFLINE=1 reads the cache only).
    name: str = "toy"
    # Hub revision / weight variant (e.g. "fp16") for cached model ids; ignored by presets.
    revision: str | None = None
    variant: str | None = None
    # Seed for the random weights of a preset (same seed -> identical components).
    seed: int = 0
    # Build the architecture with seeded random weights instead of loading weights: for tests and dry
    # runs of a full-size config without its files (a directory's own configs; SD 1.x ids use "sd15").
    random_weights: bool = False
    # Attention kernels: "sdpa" (torch scaled_dot_product_attention, diffusers' default) or
    # "xformers" (needs `pip install social-refl[xformers]` and CUDA).
    attention: str = "sdpa"
    # Another VAE in place of the model's own: a diffusers AutoencoderKL directory (or a pipeline directory
    # with vae/) or hub id, e.g. an fp16-safe SDXL VAE for fp16 runs; None = the model's VAE.
    vae: str | None = None


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


# Names of the weight / activation dtypes in configs and CLIs ("no" is accelerate's word for fp32).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# Full-size architectures shipped as diffusers/transformers config files (no weights).
# sdxl: SDXL base 1.0 (UNet about 2.6B parameters, CLIP ViT-L and OpenCLIP bigG text encoders, 1024 px).
ARCHITECTURES: dict[str, Path] = {"sd15": MODEL_CONFIG_DIR / "sd15", "sdxl": MODEL_CONFIG_DIR / "sdxl"}
# Hub ids whose architecture is one of ARCHITECTURES (for random_weights without a download).
HUB_ARCHITECTURES: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}
# SDXL's second tokenizer pads with "!" (what its released tokenizer_2 does); the first pads with
# <|endoftext|>.
SDXL_PAD_TOKEN_2 = "!"


# How the UNet recomputes on the gradient path: not at all, diffusers' own blocks (each resnet and
# transformer block), or each UNet call with gradient as a whole (refl.step wraps the call).
UNET_CHECKPOINTING = ("none", "blocks", "calls")


@dataclass(frozen=True)
class Checkpointing:
    """Which forwards on the gradient path are recomputed in backward instead of stored. A whole UNet call
    is only ever checkpointed with its blocks not, so each forward runs at most twice."""

    unet: str = "none"  # one of UNET_CHECKPOINTING
    vae_decoder: bool = False  # the decoder's mid and up blocks
    critic: bool = False  # the reward model's transformer blocks (applied by whoever builds the reward)

    def __post_init__(self):
        if self.unet not in UNET_CHECKPOINTING:
            raise ValueError(f"Checkpointing.unet must be one of {UNET_CHECKPOINTING}, got {self.unet!r}")

    @property
    def any(self) -> bool:
        return self.unet != "none" or self.vae_decoder or self.critic


@dataclass
class SDComponents:
    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler: Any  # the training noise scheduler (DDPMScheduler config of the model)
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection (pooled embedding); None for SD 1.x / 2.x
    tokenizer_2: Any = None  # SDXL: its CLIPTokenizer
    # SDXL: an empty negative prompt is zero embeddings (True, SDXL base's setting and the stock pipeline's
    # default) or the encoded "" (False); read from the model's model_index.json, used by training and by
    # every pipeline built here, so both draw what StableDiffusionXLPipeline.from_pretrained(model) draws.
    force_zeros_for_empty_prompt: bool = True
    source: str = ""  # where they came from (preset name or path), for logs and metadata
    extra: dict = field(default_factory=dict)
    # dtype of the frozen base weights (fp16/bf16 under mixed precision); LoRA tensors stay fp32.
    dtype: torch.dtype = torch.float32
    # What is recomputed in backward; set through set_gradient_checkpointing, read by refl.step.
    checkpointing: Checkpointing = field(default_factory=Checkpointing)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by their diffusers names (text_encoder, and text_encoder_2 for SDXL)."""
        out = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, **self.text_encoders()}

    def vae_stays_fp32(self, dtype: torch.dtype | None) -> bool:
        """Whether the VAE keeps fp32 weights when the base runs in `dtype`: under fp16, unless its config
        says it is fp16-safe (`force_upcast: false`)."""
        return dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", True))

    def to(self, device=None, dtype=None) -> SDComponents:
        for name, m in self.modules().items():
            keep = name == "vae" and self.vae_stays_fp32(dtype)
            m.to(device=device, dtype=torch.float32 if keep else dtype)
        if dtype is not None:
            self.dtype = dtype
        return self

    def vae_autocast(self):
        """Where the VAE runs: outside autocast when its weights stayed fp32 under an fp16 base (autocast
        would compute its convolutions in fp16 and overflow), else as everything else does."""
        if self.dtype == torch.float16 and self.vae.dtype == torch.float32:
            return torch.autocast(self.vae.device.type, enabled=False)
        return contextlib.nullcontext()

    def set_gradient_checkpointing(self, policy: Checkpointing) -> None:
        """Recompute what `policy` names in backward instead of storing its activations (its critic part
        is the reward's to apply). diffusers only checkpoints while gradients are enabled, so no-grad
        sampling is unaffected."""
        for module, on in ((self.unet, policy.unet == "blocks"), (self.vae, policy.vae_decoder)):
            if on:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()
        self.checkpointing = policy

    def autocast(self):
        """Autocast to the base weights' dtype, so fp32 latents and fp32 LoRA tensors meet half-precision
        weights without dtype errors; a no-op for an fp32 base. Every forward pass of the base runs in it."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.unet.device.type, dtype=self.dtype)


# ----------------------------------------------------------------------------- tokenizer
def _cache_dir() -> Path:
    root = os.environ.get("SOCIAL_REFL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "social-refl")
    return Path(root)


def clip_vocab_files(directory: str | os.PathLike | None = None) -> Path:
    """Write CLIP's `vocab.json` (49,408 tokens) and `merges.txt`, rebuilt from open_clip's BPE file.

    The order reproduces OpenAI CLIP's: byte symbols, byte symbols + "</w>", one token per merge,
    then <|startoftext|>, <|endoftext|>. Files are written atomically and reused when present.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    directory = Path(directory) if directory is not None else _cache_dir() / "clip-tokenizer"
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return directory
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}")
    # Concurrent builders never see half files; vocab.json last, as the check above reads it first.
    atomic_write_text(directory / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(directory / "vocab.json",
                      json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    return directory


def build_clip_tokenizer(context_length: int = 77, directory: str | os.PathLike | None = None,
                         pad_token: str = "<|endoftext|>"):
    """A real `CLIPTokenizer` with OpenAI CLIP's vocabulary, built without network access (`pad_token`:
    SDXL's second tokenizer pads with "!").

    transformers 5's `CLIPTokenizer` takes the vocabulary as `vocab=` (dict) and `merges=` (list of pairs);
    the older `vocab_file=` / `merges_file=` keywords are silently ignored there and give garbage
    ids, so the contents are passed explicitly (tests compare the ids with open_clip's).
    """
    from transformers import CLIPTokenizer

    files = clip_vocab_files(directory)
    vocab = json.loads((files / "vocab.json").read_text())
    merges = (files / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(m.split()) for m in merges if m]  # the tokenizers backend wants (left, right) pairs
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length, pad_token=pad_token)


# ----------------------------------------------------------------------------- presets
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
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source=f"preset:{name}", **second)


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
    return SDComponents(unet_model, vae_model, text_model, tokenizer, sched, source=source, **second)


def build_architecture(name: str, seed: int = 0) -> SDComponents:
    """A full-size architecture of ARCHITECTURES with seeded random weights (nothing downloaded)."""
    root = ARCHITECTURES[name]
    parts = ["unet", "vae", "text_encoder", "scheduler"] + (
        ["text_encoder_2"] if (root / "text_encoder_2.json").is_file() else [])
    configs = {part: json.loads((root / f"{part}.json").read_text()) for part in parts}
    return build_from_configs(**configs, seed=seed, source=f"preset:{name}")


def _random_from_directory(name: str, seed: int) -> SDComponents:
    from transformers import CLIPTokenizer

    root = Path(name)
    read = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
            "scheduler": "scheduler/scheduler_config.json"}
    if (root / "text_encoder_2").is_dir():
        read["text_encoder_2"] = "text_encoder_2/config.json"
    missing = [rel for rel in read.values() if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"model.random_weights: {root} lacks {missing} (a diffusers Stable Diffusion "
                                "directory has unet/, vae/, text_encoder/, scheduler/ and tokenizer/)")
    configs = {part: json.loads((root / rel).read_text()) for part, rel in read.items()}
    tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")}
    if "text_encoder_2" in configs:
        tokenizers["tokenizer_2"] = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
    components = build_from_configs(**configs, seed=seed, source=f"random:{name}", **tokenizers)
    if components.is_sdxl:
        components.force_zeros_for_empty_prompt = _force_zeros_for_empty_prompt(_model_index(name, {}))
    return components


# ----------------------------------------------------------------------------- loading
def _model_index(name: str, kw: dict) -> dict:
    """A diffusers directory's or hub id's model_index.json ({} for a directory without one)."""
    from diffusers import DiffusionPipeline

    if Path(name).is_dir():
        index = Path(name) / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else {}
    return dict(DiffusionPipeline.load_config(name, **kw))


def _force_zeros_for_empty_prompt(index: dict) -> bool:
    """An SDXL model's empty-negative-prompt setting from its model_index.json; the default is on."""
    return bool(index.get("force_zeros_for_empty_prompt", True))


def _is_sdxl_model(name: str, index: dict) -> bool:
    """Whether a diffusers directory or hub id is an SDXL model: it has text_encoder_2 (`index`: its
    model_index.json)."""
    if Path(name).is_dir():
        return (Path(name) / "text_encoder_2").is_dir()
    return "text_encoder_2" in index


def _from_pretrained(name: str, revision: str | None, variant: str | None) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(name).is_dir()
    if local and not (Path(name) / "unet").is_dir():
        raise FileNotFoundError(f"{name} is not a diffusers Stable Diffusion directory (no unet/ subfolder)")
    # A hub id downloads once into the Hugging Face cache, as diffusers does; HF_HUB_OFFLINE=1 reads the
    # cache only.
    kw: dict[str, Any] = {} if local else {"revision": revision}
    try:
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)
        # SDXL ships an Euler scheduler config; its betas and prediction type are what DDPM reads from it.
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
        second = {}
        index = _model_index(name, kw)
        if _is_sdxl_model(name, index):
            second["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                name, subfolder="text_encoder_2", variant=variant, **kw).to(torch.float32)
            second["tokenizer_2"] = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw)
            second["force_zeros_for_empty_prompt"] = _force_zeros_for_empty_prompt(index)
    except OSError as err:
        if local:
            raise
        raise OSError(
            f"model {name!r} is neither a preset ({sorted(PRESETS) + sorted(ARCHITECTURES)}), a diffusers "
            f"directory, nor a Stable Diffusion model id that could be loaded ({err}). "
            + unreachable_advice("point model.name at a local diffusers directory.")
        ) from err
    # Weights may be stored in fp16 (the shipped toy model is); diffusers upcasts its models on load,
    # transformers keeps the stored dtype. Start every module in fp32: training casts the frozen base
    # to its mixed-precision dtype itself.
    text_encoder.to(torch.float32)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source=str(name), **second)


def load_vae(name: str, revision: str | None = None):
    """An AutoencoderKL from a VAE directory (config.json at its top), a pipeline directory (vae/), or a
    hub id of either kind (`model.vae`)."""
    from diffusers import AutoencoderKL

    root = Path(name)
    if root.is_dir():
        if (root / "config.json").is_file():
            return AutoencoderKL.from_pretrained(root)
        if (root / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(root, subfolder="vae")
        raise FileNotFoundError(f"model.vae {name} holds neither config.json nor vae/config.json (a "
                                "diffusers AutoencoderKL folder, or a pipeline folder with vae/)")
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:  # a path (a hub id is owner/name)
        raise FileNotFoundError(f"model.vae {name} does not exist (a diffusers AutoencoderKL folder, a "
                                "pipeline folder with vae/, or a hub id such as "
                                "madebyollin/sdxl-vae-fp16-fix)")
    try:
        return AutoencoderKL.from_pretrained(name, revision=revision)
    except OSError as err:
        raise OSError(f"model.vae {name!r} could not be loaded as a hub VAE "
                      f"({str(err).strip().splitlines()[0]}). "
                      + unreachable_advice("point model.vae at a local VAE folder.")) from err


def enable_attention(components: SDComponents, attention: str) -> None:
    """Select attention kernels; xformers is optional and fails at start with an install hint."""
    if attention == "sdpa":
        return  # diffusers uses torch.nn.functional.scaled_dot_product_attention by default
    if attention != "xformers":
        raise ValueError(f"model.attention must be 'sdpa' or 'xformers', got {attention!r}")
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "model.attention=xformers but xformers is not installed: `pip install social-refl[xformers]` "
            "(needs CUDA), or set model.attention=sdpa"
        ) from err
    try:
        components.unet.enable_xformers_memory_efficient_attention()
        components.vae.enable_xformers_memory_efficient_attention()
    except Exception as err:  # xformers imports on CPU but its kernels refuse to run there
        raise RuntimeError(f"xformers is installed but cannot run here ({err}); set "
                           "model.attention=sdpa") from err


def load_components(cfg: ModelConfig | str) -> SDComponents:
    """The one factory: a preset name, a diffusers directory, or a locally cached model id."""
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    if cfg.name in PRESETS:
        components = build_preset(cfg.name, seed=cfg.seed)
    elif cfg.name in ARCHITECTURES:
        components = build_architecture(cfg.name, seed=cfg.seed)
    elif cfg.random_weights:
        if Path(cfg.name).is_dir():
            components = _random_from_directory(cfg.name, cfg.seed)
        elif cfg.name in HUB_ARCHITECTURES:
            components = build_architecture(HUB_ARCHITECTURES[cfg.name], seed=cfg.seed)
        else:
            raise ValueError(f"model.random_weights: no architecture known for {cfg.name!r}; use a diffusers "
                             f"directory, a preset {sorted(PRESETS) + sorted(ARCHITECTURES)}, or one of "
                             f"{sorted(HUB_ARCHITECTURES)}")
    else:
        components = _from_pretrained(cfg.name, cfg.revision, cfg.variant)
    if cfg.vae:
        components.vae = load_vae(cfg.vae, cfg.revision)
        logger.info("VAE from %s (force_upcast=%s)", cfg.vae,
                    getattr(components.vae.config, "force_upcast", None))
    enable_attention(components, cfg.attention)
    logger.info("SD components from %s: UNet %.2fM params, %d px images", components.source,
                sum(p.numel() for p in components.unet.parameters()) / 1e6, components.image_size)
    return components


def build_pipeline(components: SDComponents, scheduler=None):
    """A stock `StableDiffusionPipeline` over these modules (no safety checker, no feature extractor), or for
    SDXL a stock `StableDiffusionXLPipeline` (no watermark; an empty negative prompt as the model says,
    `force_zeros_for_empty_prompt`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler if scheduler is not None else components.scheduler,
            force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler if scheduler is not None else components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(components: SDComponents, directory: str | os.PathLike) -> Path:
    """Save as a standard diffusers directory (`StableDiffusionPipeline.from_pretrained(dir)`, for SDXL
    `StableDiffusionXLPipeline.from_pretrained(dir)`, loads it), atomically: a crash never leaves a
    half-written model."""
    with atomic_dir(directory) as tmp:
        build_pipeline(components).save_pretrained(tmp, safe_serialization=True)
    return Path(directory)
