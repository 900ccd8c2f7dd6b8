"""Pre-train the toy world's flow-matching model: an SD 3 transformer on the toy SD's latent space and text
encoder, saved as a standard diffusers `StableDiffusion3Pipeline` directory.

Design, and why:
- **SD 3's family** (`SD3Transformer2DModel`, `StableDiffusion3Pipeline`), not FLUX's: SD 3's pipeline runs
  without its T5 (`text_encoder_3=None`: it puts zeros where T5's states would be), so the toy world's own
  CLIP can be the whole text side; FLUX's pipeline needs a T5, whose states would be a random encoder's.
- **The toy SD's VAE, frozen** (4x8x8 latents of 32 px images): the UNet was measured on it, so both models
  decode through the same ceiling (`vae_ceiling_fidelity`). SD 3's pipeline decodes `z / scaling_factor +
  shift_factor`; both are fitted here on the training renders' latents (their mean and spread), so the
  transformer sees zero-mean unit-variance latents. The encoder and decoder weights are the toy SD's.
- **The toy SD's text encoder, frozen, as both CLIPs** (`text_encoder` and `text_encoder_2`, each a
  `CLIPTextModelWithProjection` whose projection is the identity, so the pooled embedding is CLIP's own
  end-of-text state): SD 3's pipeline concatenates the two encoders' penultimate states (64 + 64 = 128 =
  the transformer's `joint_attention_dim`, so no padding) and their pooled embeddings (128). Frozen, as SD 3
  trains with frozen text encoders; the toy SD trained this encoder with its UNet, so it already separates
  the world's prompts. The training prompts' embeddings are computed once by the pipeline's own
  `encode_prompt`.
- **T5's zeros, run exactly and cheaply**: the stock pipeline appends 256 zero "T5" tokens to the 16 CLIP
  tokens (`max_sequence_length`), four times the rest of the sequence. The 256 are identical through every
  block, so attention over them equals attention over one with its logit raised by log 256
  (`refl.components.zero_t5`, which `load_components` installs on every T5-less SD 3). Training, the fidelity
  measurement and every later run of this project use the one-token context; the stock pipeline's 256-token
  call over the same modules gives the same images (tested).
- **Flow matching** as SD 3: x_t = (1 - sigma) x0 + sigma noise, the transformer predicts the velocity
  noise - x0 at timestep 1000 sigma, sigma drawn logit-normal (m 0, s 1: SD 3's choice, Esser et al. 2024)
  or uniform. The sampler's shift is 1: SD 3's shift of 3 keeps the signal-to-noise ratio of its 128x128
  latents comparable to smaller ones; 8x8 latents need no shift towards noise.
- 10% empty prompts (classifier-free guidance), an EMA of the weights (what ships), a wall-clock budget, the
  fidelity measurement with the world's checker at the demo's sampling settings, the fp16 save: the same
  pieces as the toy SD's (toyworld/pretraining.py).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refl.components import SDComponents, build_pipeline, collapse_zero_t5, load_components, t5_options
from runkit.config import resolve_device
from runkit.files import check_output_dir
from toyworld.pretraining import (
    encode_latents,
    render_training_data,
    save_and_measure,
    train_budgeted,
)
from toyworld.world import ASSETS

logger = logging.getLogger(__name__)

# The shipped toy SD, whose VAE and text encoder the flow model reuses.
TOY_SD = str(ASSETS / "toy-sd")
T_SAMPLINGS = ("logit_normal", "uniform")


@dataclass
class PretrainFlowConfig:
    # Rendered (image, prompt) training examples: the toy SD's second edition's data (same count, mix, seed).
    n_images: int = 20000
    # Share of them whose look is drawn across the whole quality range (datasets.render_dataset).
    quality_fraction: float = 0.75
    # Seed for rendering, weights and sampling.
    seed: int = 0
    # The toy SD directory whose VAE and text encoder are reused, frozen.
    sd_model: str = TOY_SD
    # Transformer: attention heads, width of one head (the model is n_heads x head_dim wide), joint blocks,
    # and latent cells per patch side (1: each of the 8x8 latent cells is a token).
    n_heads: int = 4
    head_dim: int = 32
    n_layers: int = 6
    patch_size: int = 1
    # Transformer optimisation steps and batch (images). The shipped model's budget, fixed before anything
    # was measured on it: as many training examples as the toy SD's UNet saw (5,385 updates of 64).
    transformer_updates: int = 5400
    transformer_batch_size: int = 64
    # Wall-clock budget of the transformer stage in minutes; 0 = no limit (stops at transformer_updates), so
    # the model is the same on every machine, however fast.
    transformer_minutes: float = 0.0
    # Peak learning rate (AdamW; 200 warm-up updates, cosine decay over transformer_updates).
    transformer_lr: float = 5e-4
    # How training draws sigma: "logit_normal" (m 0, s 1) or "uniform".
    t_sampling: str = "logit_normal"
    # The sampler's fixed timestep shift (FlowMatchEulerDiscreteScheduler; SD 3 uses 3.0 at 1024 px).
    shift: float = 1.0
    # EMA decay of the transformer's weights (the EMA is what ships).
    ema_decay: float = 0.999
    # Share of training prompts replaced by "" so the model also learns the unconditional branch.
    uncond_prob: float = 0.1
    # Held-out prompts sampled at the end to measure prompt fidelity.
    n_eval_prompts: int = 96
    # Sampler steps and classifier-free guidance of that measurement's samples (the demo's settings).
    eval_num_inference_steps: int = 20
    eval_guidance_scale: float = 4.0
    # Where the diffusers pipeline directory goes.
    output_dir: str = "runs/toy-flow"
    # "cpu", "cuda", or "" for cuda when available.
    device: str = ""
    # torch CPU threads (0 = torch's default).
    threads: int = 0

    def __post_init__(self):
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {self.t_sampling!r}")
        if 8 % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide the 8x8 latents (1, 2, 4 or 8)")


def with_projection(text_encoder):
    """A CLIPTextModel as the CLIPTextModelWithProjection SD 3's pipeline reads (its pooled embedding is the
    projected end-of-text state), the projection the identity: the pooled embedding is the encoder's own."""
    from transformers import CLIPTextModelWithProjection

    hidden = text_encoder.config.hidden_size
    config = copy.deepcopy(text_encoder.config)
    config.projection_dim = hidden
    config.architectures = ["CLIPTextModelWithProjection"]
    model = CLIPTextModelWithProjection(config).float()  # the config names the stored dtype (fp16)
    model.text_model.load_state_dict(text_encoder.state_dict())  # every weight but the projection
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(hidden))
    return model.eval().requires_grad_(False)


def build_toy_flow(cfg: PretrainFlowConfig) -> SDComponents:
    """The toy flow model's components: a seeded random SD3Transformer2DModel on the toy SD's VAE (shift 0
    and the toy SD's scale until `fit_latent_normalisation`) and text encoder (as both CLIPs), no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    sd = load_components(cfg.sd_model)
    if sd.family != "sd":
        raise ValueError(f"sd_model {cfg.sd_model} is a {sd.family} model; the toy flow model reuses a "
                         "Stable Diffusion 1.x-style directory's VAE and text encoder (the toy SD's)")
    vae = sd.vae.eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD 3's pipeline decodes z / scaling_factor + shift_factor
    text_encoder = with_projection(sd.text_encoder)
    latent_size = sd.latent_size
    width = cfg.n_heads * cfg.head_dim
    clip_width = 2 * text_encoder.config.hidden_size  # the two CLIPs' states side by side
    torch.manual_seed(cfg.seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch_size, in_channels=sd.latent_channels,
        out_channels=sd.latent_channels, num_layers=cfg.n_layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.n_heads, joint_attention_dim=clip_width, caption_projection_dim=width,
        pooled_projection_dim=clip_width, pos_embed_max_size=latent_size // cfg.patch_size,
        qk_norm="rms_norm")  # SD 3.5's: keeps attention logits bounded at a small model's high learning rate
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    collapse_zero_t5(transformer, sd.tokenizer.model_max_length)  # as load_components does without a T5
    return SDComponents(None, vae, text_encoder, sd.tokenizer, scheduler,
                        text_encoder_2=copy.deepcopy(text_encoder), tokenizer_2=copy.deepcopy(sd.tokenizer),
                        transformer=transformer, family="sd3", source="toy-flow")


def fit_latent_normalisation(vae, raw: torch.Tensor) -> tuple[float, float]:
    """Set the VAE's shift_factor and scaling_factor so that (z - shift) * scale of the latents `raw`
    (N, C, h, w) has mean 0 and variance 1; returns (mean, std)."""
    mean, std = raw.mean().item(), raw.std().item()
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return mean, std


@torch.no_grad()
def encode_prompts(components: SDComponents, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's conditioning as the stock pipeline computes it, with one zero T5 token instead of 256
    (refl.components.zero_t5 stands it for the rest): states (N, 16 + 1, 128), pooled (N, 128)."""
    pipe = build_pipeline(components)
    states, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              device=components.transformer.device,
                                              do_classifier_free_guidance=False,
                                              **t5_options(components.transformer))
    return states, pooled


def draw_sigmas(n: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """(n,) noise levels in (0, 1): logit-normal (m 0, s 1) or uniform."""
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=gen))
    return torch.rand(n, generator=gen)


def train_transformer(components: SDComponents, latents: torch.Tensor, prompts: list[str],
                      cfg: PretrainFlowConfig, gen: torch.Generator) -> dict:
    """The flow-matching stage on scaled latents (N, C, h, w) of `prompts`; the EMA weights stay in the
    transformer."""
    transformer = components.transformer
    distinct = sorted(set(prompts))
    states, pooled = encode_prompts(components, [""] + distinct)  # (P + 1, T, D), (P + 1, D); row 0 is ""
    row = {p: i + 1 for i, p in enumerate(distinct)}
    rows = torch.tensor([row[p] for p in prompts])  # (N,)
    device = transformer.device
    params = [p for p in transformer.parameters() if p.requires_grad]

    def loss_of_step(step: int) -> torch.Tensor:
        idx = torch.randint(0, latents.shape[0], (cfg.transformer_batch_size,), generator=gen)
        x0 = latents[idx].to(device)  # (B, C, h, w)
        cond = rows[idx].clone()  # (B,)
        cond[torch.rand(cfg.transformer_batch_size, generator=gen) < cfg.uncond_prob] = 0
        noise = torch.randn(x0.shape, generator=gen).to(device)
        sigma = draw_sigmas(cfg.transformer_batch_size, cfg.t_sampling, gen).to(device)  # (B,)
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise  # (B, C, h, w)
        pred = transformer(noisy, encoder_hidden_states=states[cond].to(device),
                           pooled_projections=pooled[cond].to(device), timestep=sigma * 1000).sample
        return F.mse_loss(pred, noise - x0)

    transformer.train()
    try:
        stats = train_budgeted(params, loss_of_step, updates=cfg.transformer_updates,
                               minutes=cfg.transformer_minutes, lr=cfg.transformer_lr,
                               ema_decay=cfg.ema_decay, desc="toy flow transformer")
    finally:
        transformer.eval()
    return {"transformer_updates": stats["updates"], "transformer_final_loss": stats["final_loss"],
            "transformer_minutes": stats["minutes"], "transformer_loss_curve": stats["loss_curve"],
            "updates_per_minute": stats["updates"] / max(stats["minutes"], 1e-9)}


def pretrain_toy_flow(cfg: PretrainFlowConfig) -> dict:
    from toyworld.pretrain_sd import vae_ceiling

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    check_output_dir(cfg.output_dir, "output_dir")  # before the run, not at its last step
    images, prompts = render_training_data(cfg.n_images, cfg.seed, cfg.quality_fraction)
    device = resolve_device(cfg.device)
    components = build_toy_flow(cfg)
    components.to(device)
    raw = encode_latents(components.vae, images)  # (N, 4, h, w), unscaled
    mean, std = fit_latent_normalisation(components.vae, raw)
    latents = (raw - mean) / std  # (N, 4, h, w): what the pipeline's decode undoes
    report = {"config": cfg.__dict__.copy(), "device": torch.cuda.get_device_name(device) if device == "cuda"
              else "cpu", "latent_mean": mean, "latent_std": std,
              "transformer_parameters": sum(p.numel() for p in components.transformer.parameters()),
              "vae_ceiling_fidelity": vae_ceiling(components.vae)}
    report.update(train_transformer(components, latents, prompts, cfg, gen))
    return save_and_measure(components, cfg, report)
