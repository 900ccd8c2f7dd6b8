"""What one model's components are and how they run: `SDComponents` (the modules, the training scheduler,
the dtype of the frozen base, what is recomputed in backward), `ModelConfig` (which model to load and how),
`Checkpointing`, and the names of the dtypes configs use.

Half precision: SDXL's VAE overflows in fp16 (its decoder's activations pass fp16's 65504). Under fp16
the VAE therefore stays in fp32 and runs outside autocast (`SDComponents.vae_autocast`) unless its config
says `force_upcast: false`, which is how fp16-safe VAEs mark themselves; bf16 has fp32's range and casts
the VAE like everything else.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch


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


# Names of the weight / activation dtypes in configs and CLIs ("no" is accelerate's word for fp32).
DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}

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

