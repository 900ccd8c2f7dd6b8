"""The flow-matching presets with seeded random weights, nothing downloaded: `"tiny-sd3"` (SD 3's layout:
SD3Transformer2DModel, CLIP-L and CLIP-G with projections, T5, the 16-channel VAE with SD3's shift and scale)
and `"tiny-flux"` (FLUX.1's: FluxTransformer2DModel on packed 2x2 latents with a guidance embedding, CLIP-L's
pooled embedding, T5, the 16-channel VAE with FLUX's shift and scale).

They use the real diffusers and transformers classes, so `StableDiffusion3Pipeline` / `FluxPipeline`, LoRA
and `load_lora_weights` run unchanged on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from refl.components.container import SDComponents
from refl.components.tokenizers import (
    CLIP_VOCAB_SIZE,
    SDXL_PAD_TOKEN_2,
    build_clip_tokenizer,
    build_t5_tokenizer,
)


@dataclass(frozen=True)
class FlowPresetSpec:
    """A small flow-matching architecture of one family."""

    family: str  # "sd3" or "flux"
    image_size: int  # pixels per side
    vae_block_out: tuple[int, ...]  # VAE channels per level; latents are image_size / 2**(len-1)
    vae_scaling_factor: float  # the released VAE's: latents = (z - shift) * scale
    vae_shift_factor: float
    heads: int  # transformer attention heads
    head_dim: int  # width of one head; the transformer is heads * head_dim wide
    layers: int  # joint (two-stream) transformer blocks
    clip_hidden: int  # width of each CLIP text encoder (and of its projection)
    t5_hidden: int  # T5 encoder width: the transformer's joint_attention_dim
    context_length: int  # CLIP tokens per prompt (SD: 77)
    single_layers: int = 0  # flux: single-stream blocks
    rope_axes: tuple[int, int, int] = (0, 0, 0)  # flux: RoPE dims per id axis, summing to head_dim
    shift: float = 1.0  # sd3: the scheduler's fixed timestep shift (SD 3 / 3.5 use 3.0)


FLOW_PRESETS: dict[str, FlowPresetSpec] = {
    # 16 px, 16x8x8 latents, 2x2 patches: 16 image tokens; 2 CLIP (32 + 32) + T5 (64).
    "tiny-sd3": FlowPresetSpec(family="sd3", image_size=16, vae_block_out=(8, 16),
                               vae_scaling_factor=1.5305, vae_shift_factor=0.0609, heads=2, head_dim=16,
                               layers=2, clip_hidden=32, t5_hidden=64, context_length=16, shift=3.0),
    # 16 px, 16x8x8 latents packed to 16 tokens of 64; CLIP-L pooled (32) + T5 (32).
    "tiny-flux": FlowPresetSpec(family="flux", image_size=16, vae_block_out=(8, 16),
                                vae_scaling_factor=0.3611, vae_shift_factor=0.1159, heads=2, head_dim=16,
                                layers=1, single_layers=1, clip_hidden=32, t5_hidden=32, context_length=16,
                                rope_axes=(4, 6, 6)),
}

LATENT_CHANNELS = 16  # SD 3's and FLUX.1's VAE


def _clip(spec: FlowPresetSpec, projection: bool, pad_token_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=spec.clip_hidden,
                            intermediate_size=4 * spec.clip_hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=spec.context_length,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id,
                            projection_dim=spec.clip_hidden, hidden_act="gelu")
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(spec: FlowPresetSpec, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1's kind (gated GELU), as SD 3 and FLUX use; no dropout, as a frozen encoder runs (T5Config's
    # default 0.1 would make a freshly built encoder's embeddings random)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=spec.t5_hidden, d_kv=16,
                                   d_ff=2 * spec.t5_hidden, num_layers=2, num_heads=spec.t5_hidden // 16,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                                   use_cache=False))


def build_flow_preset(name: str, seed: int = 0, spec: FlowPresetSpec | None = None) -> SDComponents:
    """Seeded random-weight components of a small flow-matching architecture (real diffusers classes); each
    component is seeded on its own so one changing never shifts the others. `spec` replaces the preset's
    own (a variant of it, for counting)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )

    if name not in FLOW_PRESETS:
        raise ValueError(f"unknown flow preset {name!r}; flow presets are {sorted(FLOW_PRESETS)}")
    spec = spec or FLOW_PRESETS[name]
    levels = len(spec.vae_block_out)
    latent_size = spec.image_size // 2 ** (levels - 1)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=spec.vae_block_out,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=spec.image_size,
                        scaling_factor=spec.vae_scaling_factor, shift_factor=spec.vae_shift_factor,
                        use_quant_conv=False, use_post_quant_conv=False)
    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed + 2)
    clip_l = _clip(spec, projection=spec.family == "sd3", pad_token_id=49407)
    if spec.family == "sd3":
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=latent_size, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=spec.layers, attention_head_dim=spec.head_dim, num_attention_heads=spec.heads,
            joint_attention_dim=spec.t5_hidden, caption_projection_dim=spec.heads * spec.head_dim,
            pooled_projection_dim=2 * spec.clip_hidden, pos_embed_max_size=latent_size)
        torch.manual_seed(seed + 3)
        clip_g = _clip(spec, projection=True, pad_token_id=0)
        torch.manual_seed(seed + 4)
        t5 = _t5(spec, len(t5_tokenizer))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.shift)
        return SDComponents(None, vae, clip_l, build_clip_tokenizer(spec.context_length), scheduler,
                            text_encoder_2=clip_g,
                            tokenizer_2=build_clip_tokenizer(spec.context_length, pad_token=SDXL_PAD_TOKEN_2),
                            text_encoder_3=t5, tokenizer_3=t5_tokenizer, transformer=transformer,
                            family="sd3", source=f"preset:{name}")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=spec.layers,
        num_single_layers=spec.single_layers,
        attention_head_dim=spec.head_dim, num_attention_heads=spec.heads, joint_attention_dim=spec.t5_hidden,
        pooled_projection_dim=spec.clip_hidden, guidance_embeds=True, axes_dims_rope=spec.rope_axes)
    torch.manual_seed(seed + 4)
    t5 = _t5(spec, len(t5_tokenizer))
    # FLUX.1's schedule: the shift grows with the image's token count (mu, computed by the pipeline)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return SDComponents(None, vae, clip_l, build_clip_tokenizer(spec.context_length), scheduler,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer, family="flux",
                        source=f"preset:{name}")
