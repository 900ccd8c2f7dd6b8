"""What one model's components are and how they run: `SDComponents` (the modules, the training scheduler,
the dtype of the frozen base, what is recomputed in backward, the model's family), `ModelConfig` (which model
to load and how), `Checkpointing`, and the names of the dtypes configs use.

Families (`SDComponents.family`, set by the factory and the one place anyone asks what a model is):
`sd` (SD 1.x / 2.x) and `sdxl` denoise with a UNet2DConditionModel trained on a DDPM schedule; `sd3`
(SD 3 / 3.5: an SD3Transformer2DModel with two CLIP and one T5 text encoder) and `flux` (FLUX.1: a
FluxTransformer2DModel with CLIP's pooled embedding, T5 and, guidance-distilled, a guidance embedding) are
flow-matching transformers that predict a velocity on a FlowMatchEulerDiscreteScheduler's schedule.

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


# Model families (see the module docstring); the flow-matching ones denoise with a transformer.
FAMILIES = ("sd", "sdxl", "sd3", "flux")
FLOW_FAMILIES = ("sd3", "flux")

# Names of the weight / activation dtypes in configs and CLIs ("no" is accelerate's word for fp32).
DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}

# How the denoiser (UNet or transformer) recomputes on the gradient path: not at all, diffusers' own blocks
# (each resnet and transformer block), or each denoiser call with gradient as a whole (refl.step wraps it).
UNET_CHECKPOINTING = ("none", "blocks", "calls")


@dataclass(frozen=True)
class Checkpointing:
    """Which forwards on the gradient path are recomputed in backward instead of stored. A whole UNet call
    is only ever checkpointed with its blocks not, so each forward runs at most twice."""

    unet: str = "none"  # the denoiser (UNet or transformer): one of UNET_CHECKPOINTING
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
    unet: Any  # UNet2DConditionModel; None for the flow families (their denoiser is `transformer`)
    vae: Any  # AutoencoderKL (16 latent channels with a shift_factor for sd3 and flux)
    text_encoder: Any  # CLIPTextModel (sd3: CLIPTextModelWithProjection, CLIP-L)
    tokenizer: Any  # CLIPTokenizer
    # The training noise scheduler: DDPMScheduler config of a UNet model, the model's own
    # FlowMatchEulerDiscreteScheduler (its shift) for a flow model.
    scheduler: Any
    # SDXL and sd3: CLIPTextModelWithProjection (pooled embedding; sd3: CLIP-G); flux: T5EncoderModel
    text_encoder_2: Any = None
    tokenizer_2: Any = None  # its tokenizer (CLIPTokenizer; flux: T5TokenizerFast)
    # SDXL: an empty negative prompt is zero embeddings (True, SDXL base's setting and the stock pipeline's
    # default) or the encoded "" (False); read from the model's model_index.json, used by training and by
    # every pipeline built here, so both draw what StableDiffusionXLPipeline.from_pretrained(model) draws.
    force_zeros_for_empty_prompt: bool = True
    source: str = ""  # where they came from (preset name or path), for logs and metadata
    # dtype of the frozen base weights (fp16/bf16 under mixed precision); LoRA tensors stay fp32.
    dtype: torch.dtype = torch.float32
    # What is recomputed in backward; set through set_gradient_checkpointing, read by refl.step.
    checkpointing: Checkpointing = field(default_factory=Checkpointing)
    # One of FAMILIES, set by the factory.
    family: str = "sd"
    transformer: Any = None  # sd3: SD3Transformer2DModel; flux: FluxTransformer2DModel
    text_encoder_3: Any = None  # sd3: T5EncoderModel
    tokenizer_3: Any = None  # sd3: T5TokenizerFast
    # A fixed prompt set's conditioning computed once (refl.conditioning.PromptEmbeddings, made by
    # refl.text_embeddings); set, the text encoders are no longer run and may be freed (then None).
    text_embeddings: Any = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"SDComponents.family must be one of {FAMILIES}, got {self.family!r}")
        if (self.transformer is None) == self.is_flow or (self.unet is None) != self.is_flow:
            raise ValueError(f"a {self.family} model denoises with a "
                             f"{'transformer' if self.is_flow else 'UNet'}, and only with that")

    @property
    def is_flow(self) -> bool:
        """A flow-matching model: it predicts a velocity, on a FlowMatchEulerDiscreteScheduler's schedule."""
        return self.family in FLOW_FAMILIES

    @property
    def guidance_embedded(self) -> bool:
        """Guidance-distilled (FLUX.1 dev): the guidance scale is an input of the transformer, one pass and no
        negative prompt; the others take classifier-free guidance with a negative pass."""
        return self.is_flow and bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def denoiser_name(self) -> str:
        """The denoiser's diffusers name: "unet" or "transformer"."""
        return "transformer" if self.is_flow else "unet"

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network the sampler calls at every step: the UNet, or a flow model's transformer."""
        return self.transformer if self.is_flow else self.unet

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Pixels per side the model draws by default: the UNet's or SD3 transformer's latent size times the
        VAE's scale; FLUX's transformer has no size, its VAE's sample_size is the one its pipelines use."""
        if self.family == "flux":
            return int(self.vae.config.sample_size)
        return int(self.denoiser.config.sample_size) * self.vae_scale

    @property
    def latent_size(self) -> int:
        """Latent cells per side of a default-size image."""
        return self.image_size // self.vae_scale

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by their diffusers names (text_encoder, and text_encoder_2 / text_encoder_3 where
        the model has them)."""
        named = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                 "text_encoder_3": self.text_encoder_3}
        return {name: m for name, m in named.items() if m is not None}

    def modules(self) -> dict[str, torch.nn.Module]:
        return {self.denoiser_name: self.denoiser, "vae": self.vae, **self.text_encoders()}

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
        for module, on in ((self.denoiser, policy.unet == "blocks"), (self.vae, policy.vae_decoder)):
            if on:
                module.enable_gradient_checkpointing()
            else:
                module.disable_gradient_checkpointing()
        self.checkpointing = policy

    def autocast(self):
        """Autocast to the base weights' dtype, so fp32 latents and fp32 LoRA tensors meet half-precision
        weights without dtype errors; a no-op for an fp32 base. Every forward pass of the base runs in it.
        The meta device has no autocast: there CPU autocast marks the region (the memory model of
        benchmarks/ casts meta tensors in it as CUDA's autocast would)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        device = self.denoiser.device.type
        return torch.autocast("cpu" if device == "meta" else device, dtype=self.dtype)

    def set_image_size(self, px: int) -> None:
        """Draw px x px images from now on instead of the model's own size (benchmarks and tests at other
        sizes): the UNet's or SD 3 transformer's latent size, FLUX's VAE's sample size."""
        if self.is_flow:  # SD 3's patches, FLUX's 2x2 packing
            cell = self.transformer.config.patch_size if self.family == "sd3" else 2
            unit, why = cell * self.vae_scale, f"the transformer reads {cell}x{cell} latent patches"
        else:
            halvings = len(self.unet.config.block_out_channels) - 1
            unit, why = 2 ** halvings * self.vae_scale, f"the UNet halves its latents {halvings} times"
        if px % unit:
            raise ValueError(f"image size {px} px must be a multiple of {unit} for this {self.family} model "
                             f"({why})")
        if self.family == "flux":
            self.vae.register_to_config(sample_size=px)
        else:
            self.denoiser.register_to_config(sample_size=px // self.vae_scale)

