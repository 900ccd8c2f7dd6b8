"""What the toy world's two diffusion pre-training scripts share (toyworld/pretrain_sd.py for the UNet,
toyworld/pretrain_flow.py for the flow-matching transformer): the rendered training data, its VAE latents,
the denoiser stage's loop (AdamW, warm-up then cosine decay, gradient clipping, an EMA of the weights that
is what ships, a wall-clock budget), the fidelity measurement with the world's checker, and the fp16 save
as a standard diffusers directory beside its pre-training report.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from refl.components import save_pipeline
from runkit.files import write_json

logger = logging.getLogger(__name__)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, H, W)


def render_training_data(n_images: int, seed: int, quality_fraction: float) -> tuple[torch.Tensor, list[str]]:
    """The pre-training renders of training-split prompts (datasets.render_dataset) as VAE input."""
    from toyworld.datasets import render_dataset

    t0 = time.perf_counter()
    images, prompts = render_dataset(n_images, seed=seed, split="train",
                                     quality_fraction=quality_fraction)  # (N, 32, 32, 3) uint8
    logger.info("rendered %d training scenes in %.1f s", len(prompts), time.perf_counter() - t0)
    return to_tensor(images), prompts


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE's latent modes of `images` (N, 3, H, W), unscaled: (N, C, h, w)."""
    return torch.cat([vae.encode(images[i:i + batch].to(vae.device)).latent_dist.mode()
                      for i in range(0, images.shape[0], batch)])


def train_budgeted(params: list[torch.nn.Parameter], loss_of_step: Callable[[int], torch.Tensor], *,
                   updates: int, minutes: float, lr: float, ema_decay: float, desc: str) -> dict:
    """The denoiser stage: up to `updates` AdamW steps of `loss_of_step(step)` (which draws its own batch),
    200 warm-up steps then cosine decay over the planned `updates`, gradients clipped to norm 1, stopped
    after `minutes` of wall clock (0 = no limit). The EMA of `params` (decay warmed up so the early EMA is
    not mostly the initialisation) is copied into them at the end: it is what ships.
    Returns the updates run, the mean loss of the last 200, the mean loss of each 100 updates in turn
    (`loss_curve`) and the minutes spent."""
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / updates))))
    start = time.perf_counter()
    losses: list[float] = []
    pbar = tqdm(range(updates), desc=desc)
    step = 0
    for step in pbar:
        loss = loss_of_step(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            pbar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if minutes and time.perf_counter() - start > minutes * 60:
            logger.info("%s hit its %.1f-minute budget at step %d", desc, minutes, step + 1)
            break
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return {"updates": step + 1, "final_loss": float(np.mean(losses[-200:])),
            "loss_curve": [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)],
            "minutes": (time.perf_counter() - start) / 60}


def sample_images(components, prompts: list[str], steps: int, guidance: float, seed: int,
                  batch: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3): image i from seed + i, with the family's sampler (DDIM for the UNet, the flow
    Euler sampler for a flow model) through its stock pipeline."""
    from refl.sampling import family_scheduler, make_pipeline, sample

    return sample(make_pipeline(components, family_scheduler(components.family)), prompts,
                  seeds=range(seed, seed + len(prompts)), num_inference_steps=steps, guidance_scale=guidance,
                  batch_size=batch)


def fidelity_eval(components, n_prompts: int, steps: int, guidance: float, seed: int) -> dict:
    """Prompt fidelity (shape, colour and background read back from the pixels by the world's checker) of
    one sample each of the first `n_prompts` held-out prompts, and each attribute's accuracy alone."""
    from toyworld.checker import prompt_fidelity
    from toyworld.world import ATTRIBUTES, split_prompts

    prompts = split_prompts(seed=0)[1][:n_prompts]
    samples = sample_images(components, prompts, steps, guidance, seed=seed)
    return {"eval_prompt_fidelity": float(prompt_fidelity(samples, prompts)),
            "eval_attribute_accuracy": {a: float(prompt_fidelity(samples, prompts, attributes=[a]))
                                        for a in ATTRIBUTES},
            "eval_n_prompts": len(prompts)}


def save_fp16(components, output_dir: str, report: dict) -> None:
    """The components in fp16 as a standard diffusers directory (written atomically), then its report; the
    components in memory stay fp32 (rounded to fp16's values: what ships is what is measured after).
    Saved before the fidelity measurement, so a failure there loses no training; the report is rewritten
    with it."""
    half = copy.copy(components)
    half.to(device="cpu", dtype=torch.float16)
    save_pipeline(half, output_dir)
    components.to(dtype=torch.float32)
    write_json(Path(output_dir) / "pretrain_report.json", report)
    logger.info("saved to %s", output_dir)


def save_and_measure(components, cfg, report: dict) -> dict:
    """The end of a pre-training run: the model saved (fp16), then its prompt fidelity measured at the
    config's eval settings and added to the saved report; returns the report. Saving comes first, so a
    failure while measuring loses no training."""
    save_fp16(components, cfg.output_dir, report)
    report.update(fidelity_eval(components, cfg.n_eval_prompts, cfg.eval_num_inference_steps,
                                cfg.eval_guidance_scale, seed=cfg.seed))
    write_json(Path(cfg.output_dir) / "pretrain_report.json", report)
    logger.info("prompt fidelity %.3f on %d held-out prompts", report["eval_prompt_fidelity"],
                report["eval_n_prompts"])
    return report
