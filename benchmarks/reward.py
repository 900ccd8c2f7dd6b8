"""Throughput of the critic: training pairs/s and scoring images/s, against a plain open_clip loop,
and streamed loading pairs/s (shards -> decoded, resized batches) so one sees whether feeding keeps up.

    python -m benchmarks.reward                                   # toy-clip and ViT-B-32, batch 32
    python -m benchmarks.reward --set 'critics=[ViT-L-14]' --set mixed_precision=bf16 \\
        --output-file benchmarks/reward_<gpu>.json
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.cli import parse_config, report, resolve_device
from reward.losses import create_loss
from reward.model import CriticConfig, create_critic
from reward.train import CriticWithLoss
from runkit.cli import command
from runkit.config import check_mixed_precision


@dataclass
class RewardBenchConfig:
    # Critic architectures to time, open_clip names or critic presets (random weights).
    critics: list[str] = field(default_factory=lambda: ["toy-clip", "ViT-B-32"])
    # Image-prompt pairs per call.
    batch_size: int = 32
    # Timed calls of the scoring comparison (the training step and mixed-precision scoring: half of them).
    repeats: int = 5
    # Where it runs: "cuda", "cpu", "cuda:1", ...; "" = CUDA when there is one, else the CPU.
    device: str = ""
    # Autocast dtype of the training step and of the extra scoring figure: "no" (fp32), "fp16" or "bf16".
    mixed_precision: str = "no"
    # Recompute the critic's transformer blocks in backward.
    gradient_checkpointing: bool = False
    # Pairs in the synthetic shard set for streamed loading pairs/s; 0 = skip it.
    stream_rows: int = 512
    # Side of the encoded JPEGs (Pick-a-Pic: 512 and more).
    stream_image_px: int = 512
    # Critic input size they are resized to.
    stream_image_size: int = 224
    # DataLoader worker counts to time.
    stream_workers: list[int] = field(default_factory=lambda: [0, 2])
    # Also write the JSON result to this file ("" = print it only).
    output_file: str = ""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision, "mixed_precision")


def _timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision])


def bench_critic(name: str, cfg: RewardBenchConfig, device: torch.device) -> dict:
    torch.manual_seed(0)
    batch = cfg.batch_size
    critic = create_critic(CriticConfig(model_name=name,
                                        training_mode="visual_upper_layers_textual_upper_layers"))
    critic.to(device).set_grad_checkpointing(cfg.gradient_checkpointing)
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

    if not torch.allclose(ours(), plain_open_clip(), atol=1e-5):  # else the ratio means nothing
        raise RuntimeError(f"{name}: the critic's scores differ from a plain open_clip loop's")
    # Interleave the two so drift in machine load hits both alike.
    t_ours, t_plain = [], []
    for _ in range(cfg.repeats):
        t_ours.append(_timed(ours, 1, warmup=0 if t_ours else 1))
        t_plain.append(_timed(plain_open_clip, 1, warmup=0 if t_plain else 1))
    t_ours_med, t_plain_med = sorted(t_ours)[len(t_ours) // 2], sorted(t_plain)[len(t_plain) // 2]

    module = CriticWithLoss(critic, create_loss("triplet")).train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    neg = torch.rand_like(images)

    def train_step():
        with _autocast(device, cfg.mixed_precision):  # as accelerate's mixed_precision does
            out = module(images, neg, prompts, None, None)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_train = _timed(train_step, max(1, cfg.repeats // 2))

    @torch.no_grad()
    def score_mixed():
        with _autocast(device, cfg.mixed_precision):
            return critic(images, tokens)

    t_score_mixed = _timed(score_mixed, max(1, cfg.repeats // 2))
    return {
        "critic": name,
        "mixed_precision": cfg.mixed_precision,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "image_size": s,
        "batch_size": batch,
        "params_total": sum(p.numel() for p in critic.parameters()),
        "params_trained": sum(p.numel() for p in critic.parameters() if p.requires_grad),
        "scoring_images_per_s": batch / t_ours_med,
        "plain_open_clip_images_per_s": batch / t_plain_med,
        "scoring_ratio_vs_plain_open_clip": t_plain_med / t_ours_med,
        "training_pairs_per_s": batch / t_train,
        "mixed_precision_scoring_images_per_s": batch / t_score_mixed,
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


def bench_streaming(cfg: RewardBenchConfig) -> dict:
    """Pairs/s of one epoch over a synthetic shard set through PairShards + the training sampler."""
    from torch.utils.data import DataLoader

    from reward.data import PairShards, PairShardSampler, collate_pairs

    rows = cfg.stream_rows
    out = {"rows": rows, "image_px": cfg.stream_image_px, "image_size": cfg.stream_image_size,
           "batch_size": cfg.batch_size, "format": "JPEG q90"}
    with tempfile.TemporaryDirectory() as tmp:
        out["mean_image_kb"] = _write_bench_shards(Path(tmp), rows, cfg.stream_image_px,
                                                   row_group=100) / (2 * rows) / 1024
        ds = PairShards(tmp, image_size=cfg.stream_image_size, tie_policy="keep")
        for w in cfg.stream_workers:
            loader = DataLoader(ds, batch_sampler=PairShardSampler(ds, cfg.batch_size),
                                collate_fn=collate_pairs, num_workers=w)
            start = time.perf_counter()
            n = sum(len(b["prompt"]) for b in loader)
            out[f"pairs_per_s_workers_{w}"] = n / (time.perf_counter() - start)
    return out


def run_benchmarks(cfg: RewardBenchConfig) -> dict:
    device = resolve_device(cfg.device, cfg.mixed_precision)
    result = {
        "config": asdict(cfg),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "results": [bench_critic(name, cfg, device) for name in cfg.critics],
    }
    if cfg.stream_rows:
        result["streamed_loading"] = bench_streaming(cfg)
    return result


@command
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RewardBenchConfig, __doc__, argv)
    report(run_benchmarks(cfg), cfg.output_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
