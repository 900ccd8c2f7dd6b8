"""Throughput of the critic: training pairs/s and scoring images/s, against a plain open_clip loop,
and streamed loading pairs/s (shards -> decoded, resized batches) so one sees whether feeding keeps up."""

from __future__ import annotations

import contextlib
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
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


def _autocast(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type,
                          dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def bench_model(model_name: str, batch: int, repeats: int, device: str, precision: str = "fp32",
                grad_checkpointing: bool = False) -> dict:
    torch.manual_seed(0)
    critic = create_critic(CriticConfig(model_name=model_name,
                                        training_mode="visual_upper_layers_textual_upper_layers"))
    critic.to(device).set_grad_checkpointing(grad_checkpointing)
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
        with _autocast(device, precision):  # as accelerate's mixed_precision does
            out = module(images, neg, prompts, None, None)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_train = _timed(train_step, max(1, repeats // 2))

    @torch.no_grad()
    def score_mixed():
        with _autocast(device, precision):
            return critic(images, tokens)

    t_score_mixed = _timed(score_mixed, max(1, repeats // 2))
    return {
        "model": model_name,
        "precision": precision,
        "grad_checkpointing": grad_checkpointing,
        "image_size": s,
        "batch": batch,
        "params_total": sum(p.numel() for p in critic.parameters()),
        "params_trained": sum(p.numel() for p in critic.parameters() if p.requires_grad),
        "scoring_images_per_s": batch / t_ours_med,
        "plain_open_clip_images_per_s": batch / t_plain_med,
        "scoring_ratio_vs_plain_open_clip": t_plain_med / t_ours_med,
        "training_pairs_per_s": batch / t_train,
        f"scoring_images_per_s_{precision}": batch / t_score_mixed,
    }


def _write_bench_shards(root: Path, rows: int, image_px: int, row_group: int) -> int:
    """Pick-a-Pic-like shards: JPEG pairs (quality 90) of smooth random images at `image_px`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(16):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((image_px, image_px), Image.BICUBIC).save(buf, format="JPEG",
                                                                                quality=90)
        pool.append(buf.getvalue())
    table = pa.table({"caption": [f"prompt {i}" for i in range(rows)],
                      "jpg_0": [pool[i % 16] for i in range(rows)],
                      "jpg_1": [pool[(i + 1) % 16] for i in range(rows)],
                      "label_0": np.ones(rows), "label_1": np.zeros(rows)})
    pq.write_table(table, root / "train-00000-of-00001.parquet", row_group_size=row_group)
    return sum(len(pool[i % 16]) + len(pool[(i + 1) % 16]) for i in range(rows))


def bench_streaming(image_size: int, rows: int, image_px: int, batch: int, workers: list[int]) -> dict:
    """Pairs/s of one epoch over a synthetic shard set through PairShards + the training sampler."""
    from torch.utils.data import DataLoader

    from reward.data import PairShards, PairShardSampler, collate_pairs

    out = {"rows": rows, "image_px": image_px, "image_size": image_size, "batch": batch, "format": "JPEG q90"}
    with tempfile.TemporaryDirectory() as tmp:
        out["mean_image_kb"] = _write_bench_shards(Path(tmp), rows, image_px,
                                                   row_group=100) / (2 * rows) / 1024
        ds = PairShards(tmp, image_size=image_size, tie_policy="keep")
        for w in workers:
            loader = DataLoader(ds, batch_sampler=PairShardSampler(ds, batch), collate_fn=collate_pairs,
                                num_workers=w)
            start = time.perf_counter()
            n = sum(len(b["prompt"]) for b in loader)
            out[f"pairs_per_s_workers_{w}"] = n / (time.perf_counter() - start)
    return out


def run_benchmarks(models: list[str], batch: int, repeats: int, device: str, precision: str = "fp32",
                   grad_checkpointing: bool = False, stream_rows: int = 0, stream_image_px: int = 512,
                   stream_image_size: int = 224, stream_workers: tuple[int, ...] = (0, 2)) -> dict:
    import os

    report = {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "results": [bench_model(m, batch, repeats, device, precision, grad_checkpointing) for m in models],
    }
    if stream_rows:
        report["streamed_loading"] = bench_streaming(stream_image_size, stream_rows, stream_image_px, batch,
                                                     list(stream_workers))
    return report
