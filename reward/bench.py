"""Throughput of the critic: training pairs/s and scoring images/s, against a plain open_clip loop."""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F

from reward.losses import create_loss
from reward.model import CriticConfig, create_critic
from reward.train import CriticWithLoss


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_model(model_name: str, batch: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    critic = create_critic(CriticConfig(model_name=model_name, training_mode="visual_upper_layers_textual_upper_layers"))
    critic.to(device)
    s = critic.image_size
    images = torch.rand(batch, 3, s, s, device=device)  # (B, 3, S, S) in [0, 1]
    prompts = [f"a photo of object number {i}" for i in range(batch)]
    tokens = critic.tokenize(prompts)  # (B, L)

    @torch.no_grad()
    def ours():
        return critic(images, tokens)

    @torch.no_grad()
    def plain_open_clip():
        img = critic.clip.encode_image((images - critic.pixel_mean) / critic.pixel_std)
        txt = critic.clip.encode_text(tokens)
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)

    assert torch.allclose(ours(), plain_open_clip(), atol=1e-5)  # same numbers, or the ratio means nothing
    # Interleave the two so drift in machine load hits both alike.
    t_ours, t_plain = [], []
    for _ in range(repeats):
        t_ours.append(_timed(ours, 1, warmup=0 if t_ours else 1))
        t_plain.append(_timed(plain_open_clip, 1, warmup=0 if t_plain else 1))
    t_ours_med, t_plain_med = sorted(t_ours)[len(t_ours) // 2], sorted(t_plain)[len(t_plain) // 2]

    module = CriticWithLoss(critic, create_loss("triplet")).train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    neg = torch.rand_like(images)

    def train_step():
        out = module(images, neg, prompts, None, None)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_train = _timed(train_step, max(1, repeats // 2))
    return {
        "model": model_name,
        "image_size": s,
        "batch": batch,
        "params_total": sum(p.numel() for p in critic.parameters()),
        "params_trained": sum(p.numel() for p in critic.parameters() if p.requires_grad),
        "scoring_images_per_s": batch / t_ours_med,
        "plain_open_clip_images_per_s": batch / t_plain_med,
        "scoring_ratio_vs_plain_open_clip": t_plain_med / t_ours_med,
        "training_pairs_per_s": batch / t_train,
    }


def run_benchmarks(models: list[str], batch: int, repeats: int, device: str) -> dict:
    return {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "results": [bench_model(m, batch, repeats, device) for m in models],
    }
