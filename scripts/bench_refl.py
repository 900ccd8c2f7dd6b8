"""Seconds per ReFL step by phase, peak memory, and our no-grad sampling vs a stock pipeline call.

    python scripts/bench_refl.py [--steps 40] [--batch 4] [--repeats 3]
Prints one JSON object: the tiny/toy preset on CPU, and SD 1.5's architecture at 512 px (random
weights, fp16) when CUDA is present.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import torch

from refl.components import SDComponents, build_pipeline, load_components
from refl.lora import LoraSettings, add_lora
from refl.step import PhaseTimer, StepConfig, reward_step


def _sd15_components(device, dtype) -> SDComponents:
    """SD 1.5's architecture with random weights (nothing downloaded); tokenizer rebuilt offline."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from refl.components import build_clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                                cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512,
                        layers_per_block=2, scaling_factor=0.18215)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False)
    return SDComponents(unet, vae, text, build_clip_tokenizer(77), sched, source="sd15-arch").to(device, dtype)


def _brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))  # (B,)


def bench(components: SDComponents, device, batch: int, steps: int, repeats: int, critic=None) -> dict:
    add_lora(components, LoraSettings(rank=4, alpha=4))
    prompts = ["a red square on a blue background"] * batch
    reward_fn = critic if critic is not None else _brightness
    # Cut fixed at the last step, so the no-grad part is steps - 1 sampler steps, comparable per step.
    cfg = StepConfig(num_inference_steps=steps, cut_range=[steps - 1, steps - 1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for r in range(repeats + 1):  # the first is warm-up
        timer = PhaseTimer(device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out = reward_step(components, prompts, reward_fn, cfg, torch.Generator().manual_seed(r), timer=timer)
        with timer("backward"):
            out["loss"].backward()
        if r:
            rows.append(timer.seconds)
    phases = {k: sum(row.get(k, 0.0) for row in rows) / len(rows) for k in rows[0]}
    # The stock pipeline with the same sampler, steps and batch, no guidance (training runs none either).
    from diffusers import DDIMScheduler

    pipe = build_pipeline(components, scheduler=DDIMScheduler.from_config(components.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    times = []
    for r in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(r))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - start)
    pipe_per_step = sum(times) / len(times) / steps
    ours_per_step = phases["sampling"] / (steps - 1)
    result = {
        "model": components.source, "device": str(device), "batch": batch, "steps": steps,
        "image_px": components.image_size,
        "seconds": {k: round(v, 4) for k, v in phases.items()},
        "seconds_per_refl_step": round(sum(phases.values()), 4),
        "no_grad_seconds_per_sampler_step": round(ours_per_step, 5),
        "pipeline_seconds_per_sampler_step": round(pipe_per_step, 5),
        "sampling_ratio_vs_pipeline": round(ours_per_step / pipe_per_step, 3),
    }
    if device.type == "cuda":
        result["peak_cuda_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="toy", help="CPU preset to time (tiny/toy)")
    p.add_argument("--steps", type=int, default=40, help="sampler steps per trajectory")
    p.add_argument("--batch", type=int, default=4, help="prompts per ReFL step (CPU preset)")
    p.add_argument("--gpu-batch", type=int, default=2, help="prompts per ReFL step (SD 1.5 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids spin-waits on shared cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    import reward

    critic = reward.load("toy-clip").requires_grad_(False)
    results = {"cpu": bench(load_components(args.preset), torch.device("cpu"), args.batch, args.steps,
                            args.repeats, critic)}
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        results["cuda_sd15"] = bench(_sd15_components(dev, torch.float16), dev, args.gpu_batch, args.steps,
                                     args.repeats)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
