"""Pre-train the toy world's tiny Stable Diffusion (real diffusers classes) on rendered scenes.

Two stages, as SD itself was built: an AutoencoderKL (x4 down, 4x8x8 latents for 32 px images),
then the UNet and the CLIP text encoder on its latents with epsilon prediction, 10% empty prompts
(so classifier-free guidance works) and an EMA of the weights. The result is saved in fp16 as a
standard diffusers pipeline directory; `StableDiffusionPipeline.from_pretrained(dir)` loads it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refl.components import ModelConfig, load_components
from runkit.config import resolve_device
from runkit.files import check_output_dir
from toyworld.pretraining import (
    encode_latents,
    render_training_data,
    save_and_measure,
    to_tensor,
    train_budgeted,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainSDConfig:
    # Rendered (image, prompt) training examples.
    n_images: int = 20000
    # Share of them whose look is drawn across the whole quality range (datasets.render_dataset); the rest
    # are plain renders. Web-like data of every quality, so the model's samples of one prompt vary in every
    # oracle term and feedback has something to select (0 = the first edition's plain renders only).
    quality_fraction: float = 0.75
    # Seed for rendering, weights and sampling.
    seed: int = 0
    # AutoencoderKL optimisation steps and batch (images). Many small steps beat few large ones here: at
    # 450 x 64 the decoder still smudged clean renders into blobs (the UNet cannot beat its VAE).
    vae_updates: int = 3000
    vae_batch_size: int = 32
    # AutoencoderKL learning rate (AdamW).
    vae_lr: float = 1e-3
    # UNet + text encoder optimisation steps (upper bound) and batch (images).
    unet_updates: int = 6000
    unet_batch_size: int = 64
    # Wall-clock budget for the UNet stage in minutes; 0 = no limit (stops at unet_updates).
    unet_minutes: float = 15.0
    # Peak learning rate of the UNet stage (cosine decay over the planned steps).
    unet_lr: float = 1e-3
    # Min-SNR loss weighting (Hang et al., ICCV 2023): each timestep's epsilon loss is weighted by
    # min(SNR, gamma) / SNR, so the nearly clean steps stop dominating and the coarse layout the prompt
    # decides (shape, colour, place) gets the capacity; 0 = plain MSE. Same formula as diffusers' --snr_gamma.
    snr_gamma: float = 5.0
    # EMA decay of UNet and text-encoder weights (the EMA is what ships).
    ema_decay: float = 0.999
    # Share of training prompts replaced by "" so the model also learns the unconditional branch.
    uncond_prob: float = 0.1
    # Held-out prompts sampled at the end to measure prompt fidelity.
    n_eval_prompts: int = 96
    # Sampler steps of that measurement's samples.
    eval_num_inference_steps: int = 20
    # Classifier-free guidance scale of that measurement's samples.
    eval_guidance_scale: float = 4.0
    # Where the diffusers pipeline directory goes.
    output_dir: str = "toyworld/assets/toy-sd"
    # "cpu", "cuda", or "" for cuda when available. Random draws come from CPU generators either way, so
    # a GPU run sees the same batches, noise and timesteps (it runs more steps in the same minutes).
    device: str = ""
    # torch CPU threads (0 = torch's default).
    threads: int = 0


def train_vae(vae, images: torch.Tensor, cfg: PretrainSDConfig, gen: torch.Generator) -> dict:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / cfg.vae_updates)))
    pbar = tqdm(range(cfg.vae_updates), desc="toy VAE")
    for _ in pbar:
        idx = torch.randint(0, images.shape[0], (cfg.vae_batch_size,), generator=gen)
        x = images[idx].to(vae.device)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        # what .sample(gen) draws, on CPU
        eps = torch.randn(posterior.mean.shape, generator=gen).to(vae.device)
        recon = vae.decode(posterior.mean + posterior.std * eps).sample
        kl = posterior.kl().mean()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        sample = images[:512].to(vae.device)
        latents = vae.encode(sample).latent_dist.mode()  # (512, 4, h, w)
        recon = vae.decode(latents).sample
    std = latents.std().item()
    # SD's convention: latents * scaling_factor have unit variance before the UNet sees them.
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_recon_mse": F.mse_loss(recon, sample).item(), "latent_std": std}


@torch.no_grad()
def vae_ceiling(vae, n: int = 256, seed: int = 1) -> dict:
    """Prompt fidelity of held-out plain renders and of the same renders through the VAE and back: the
    most the UNet can reach, since every sample is decoded by this VAE."""
    from refl.sampling import to_uint8
    from toyworld.checker import prompt_fidelity
    from toyworld.datasets import render_dataset

    images, prompts = render_dataset(n, seed=seed, split="heldout", quality_fraction=0.0)  # (n, 32, 32, 3)
    x = to_tensor(images).to(vae.device)  # (n, 3, H, W) in [-1, 1]
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample  # (n, 3, H, W)
    return {"renders": float(prompt_fidelity(images, prompts)),
            "vae_reconstructions": float(prompt_fidelity(to_uint8((recon + 1) / 2), prompts))}


def train_unet(components, latents: torch.Tensor, prompts: list[str], cfg: PretrainSDConfig,
               gen: torch.Generator) -> dict:
    unet, text_encoder, tokenizer, scheduler = (components.unet, components.text_encoder,
                                                components.tokenizer, components.scheduler)
    # A random token table learns nothing useful for 49k mostly unused ids; positions and layers adapt.
    text_encoder.get_input_embeddings().requires_grad_(False)
    params = [p for p in list(unet.parameters()) + list(text_encoder.parameters()) if p.requires_grad]
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids  # (N, L)
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids  # (1, L)
    alphas = scheduler.alphas_cumprod.to(latents.device)  # (T,)
    snr_all = alphas / (1 - alphas)  # (T,) signal-to-noise ratio per timestep

    def loss_of_step(step: int) -> torch.Tensor:
        idx = torch.randint(0, latents.shape[0], (cfg.unet_batch_size,), generator=gen)
        x0 = latents[idx.to(latents.device)]  # (B, 4, h, w)
        ids = tokens[idx].clone()  # (B, L)
        drop = torch.rand(cfg.unet_batch_size, generator=gen) < cfg.uncond_prob
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch_size,),
                          generator=gen).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t)
        hidden = text_encoder(ids.to(x0.device))[0]  # (B, L, D)
        pred = unet(noisy, t, encoder_hidden_states=hidden).sample
        per_example = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.snr_gamma:
            snr = snr_all[t]  # (B,)
            per_example = per_example * snr.clamp(max=cfg.snr_gamma) / snr
        return per_example.mean()

    unet.train()
    text_encoder.train()
    stats = train_budgeted(params, loss_of_step, updates=cfg.unet_updates, minutes=cfg.unet_minutes,
                           lr=cfg.unet_lr, ema_decay=cfg.ema_decay, desc="toy UNet")
    unet.eval()
    text_encoder.eval()
    return {"unet_updates": stats["updates"], "unet_final_loss": stats["final_loss"],
            "unet_minutes": stats["minutes"]}


def pretrain_toy_sd(cfg: PretrainSDConfig) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    check_output_dir(cfg.output_dir, "output_dir")  # before the run, not at its last step
    images, prompts = render_training_data(cfg.n_images, cfg.seed, cfg.quality_fraction)
    components = load_components(ModelConfig(name="toy", seed=cfg.seed))
    device = resolve_device(cfg.device)
    components.to(device)
    report = {"config": cfg.__dict__.copy(), "device": torch.cuda.get_device_name(device) if device == "cuda"
              else "cpu"}
    report.update(train_vae(components.vae, images, cfg, gen))
    report["vae_ceiling_fidelity"] = vae_ceiling(components.vae)
    logger.info("VAE: held-out renders keep their prompt through encode/decode %.1f%% of the time",
                100 * report["vae_ceiling_fidelity"]["vae_reconstructions"])
    latents = encode_latents(components.vae, images) * components.vae.config.scaling_factor  # (N, 4, h, w)
    report.update(train_unet(components, latents, prompts, cfg, gen))
    return save_and_measure(components, cfg, report)
