"""ReFL at real size, measured: seconds per update by phase, peak memory with and without gradient
checkpointing, model-FLOP utilisation, and our sampling against a stock StableDiffusionPipeline.

`run_benchmark(BenchConfig(...))` returns one JSON-able dict; `scripts/bench_refl.py` adds the
comparison harness's best-of-N sampler (evaluation.harness.best_of_n_throughput), prints it and
writes it under benchmarks/. On CUDA the default is the issue's setting: SD 1.5's architecture at
512 px (random weights: speed does not depend on them), batch 8, 40 DDPM steps, bf16, LoRA r4, a
ViT-L-14 critic. On a CPU it runs the toy preset so the script itself stays tested.
"""

from __future__ import annotations

import logging
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from refl.components import DTYPES, ModelConfig, load_components
from refl.lora import LoraConfig, add_lora
from refl.step import PhaseTimer, StepConfig, checkpointing_for, reward_step

logger = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name substring.
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "A10G": 70.0, "L4": 121.0}


@dataclass
class BenchConfig:
    # SD model: a preset ("sd15" = SD 1.5's architecture, random weights; "toy"), directory or hub id.
    model: str = "sd15"
    # Critic: an open_clip name (random weights unless "name:pretrained") or a critic directory.
    critic: str = "ViT-L-14"
    # Prompts per ReFL update and per sampling call (one process).
    batch: int = 8
    # Sampler steps per trajectory; the cut is fixed at the last step so phases compare across runs.
    steps: int = 40
    # Training sampler: "ddpm" (ImageReward's) or "ddim".
    scheduler: str = "ddpm"
    # Weights and autocast dtype: "bf16", "fp16" or "fp32".
    dtype: str = "bf16"
    # Timed updates after one warm-up.
    repeats: int = 3
    # Best-of-N throughput: images per harness batch against the stock call (the harness's default 16).
    best_of_batch: int = 16
    # Device peak in TFLOP/s for the utilisation figure; 0 = look the device name up in PEAK_TFLOPS.
    peak_tflops: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _setup(cfg: BenchConfig, device: torch.device):
    import reward

    dtype = DTYPES[cfg.dtype]
    components = load_components(ModelConfig(name=cfg.model)).to(device, dtype)
    params = add_lora(components, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():  # B starts at 0, which would leave A without gradient and skip its kernels
        for p in params[1::2]:
            p.normal_(0.0, 1e-3)
    components.unet.train()
    critic = reward.load(cfg.critic, device=device).requires_grad_(False).eval()
    critic.clip.to(dtype)
    return components, params, critic


def _update(components, params, critic, cfg: BenchConfig, prompts, seed: int, timer=None) -> None:
    step = StepConfig(method="refl", scheduler=cfg.scheduler, num_inference_steps=cfg.steps,
                      cut_range=[cfg.steps - 1, cfg.steps - 1])
    out = reward_step(components, prompts, critic, step, torch.Generator().manual_seed(seed), timer=timer)
    if timer is None:
        out["loss"].backward()
    else:
        with timer("backward"):
            out["loss"].backward()
    for p in params:
        p.grad = None


def time_updates(components, params, critic, cfg: BenchConfig, prompts, device, checkpointing: bool) -> dict:
    """Mean seconds per phase over `repeats` updates (after a warm-up) and the peak memory of one."""
    policy = checkpointing_for("refl", checkpointing)
    components.set_gradient_checkpointing(policy)
    critic.set_grad_checkpointing(policy.critic)
    _update(components, params, critic, cfg, prompts, 0)  # warm-up: kernels, allocator
    _reset_peak(device)
    rows = []
    for r in range(cfg.repeats):
        timer = PhaseTimer(device)
        _update(components, params, critic, cfg, prompts, r + 1, timer)
        rows.append(timer.seconds)
    phases = {k: float(np.mean([row.get(k, 0.0) for row in rows])) for k in rows[0]}
    return {"seconds_by_phase": phases, "seconds_per_update": sum(phases.values()),
            "peak_memory_gib": _peak_gib(device)}


def update_flops(components, params, critic, cfg: BenchConfig, prompts) -> int:
    """FLOPs of one update (forward, recomputation excluded, and backward) as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    components.set_gradient_checkpointing(checkpointing_for("refl", False))
    critic.set_grad_checkpointing(False)
    counter = FlopCounterMode(display=False)
    with counter:
        _update(components, params, critic, cfg, prompts, 0)
    return int(counter.get_total_flops())


def stock_sampling_ratio(components, cfg: BenchConfig, prompts, device) -> dict:
    """Our no-grad sampling (refl.sampling.sample, which drives the stock pipeline) against a bare
    stock pipeline call with the same sampler, steps and batch: the cost of our wrapper."""
    from refl.sampling import make_pipeline, sample

    dtype = DTYPES[cfg.dtype]
    pipe = make_pipeline(components, cfg.scheduler)

    def ours():
        with components.autocast():
            sample(pipe, prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=cfg.steps,
                   batch_size=len(prompts), output="latent")

    def stock():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pipe(prompts, num_inference_steps=cfg.steps, guidance_scale=1.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0))

    times = {"ours": [], "stock": []}
    for fn in (ours, stock):  # warm-up
        fn()
    for _ in range(cfg.repeats):  # alternating, fastest of each: shared machines are noisy
        for name, fn in (("ours", ours), ("stock", stock)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {"ours_seconds": min(times["ours"]), "stock_seconds": min(times["stock"]),
            "ratio": min(times["ours"]) / min(times["stock"])}


def peak_tflops(cfg: BenchConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_benchmark(cfg: BenchConfig, device: torch.device | None = None,
                  extras: dict[str, Callable[[object, BenchConfig, torch.device], dict]] | None = None) -> dict:
    """Every measurement of the module docstring, as one dict. `extras`: further timings of the same loaded
    components, `name -> fn(components, cfg, device)`, from layers above refl/ (scripts/bench_refl.py adds
    the comparison harness's best-of-N sampler this way, since refl/ may not import evaluation/)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    components, params, critic = _setup(cfg, device)
    prompts = ["a photo of an astronaut riding a horse on mars"] * cfg.batch
    result = {"config": asdict(cfg), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "image_px": components.image_size}
    result["checkpointing"] = time_updates(components, params, critic, cfg, prompts, device, True)
    result["no_checkpointing"] = time_updates(components, params, critic, cfg, prompts, device, False)
    flops = update_flops(components, params, critic, cfg, prompts)
    seconds = result["no_checkpointing"]["seconds_per_update"]
    peak = peak_tflops(cfg, device)
    result["update_tflop"] = flops / 1e12
    result["achieved_tflops"] = flops / seconds / 1e12
    result["peak_tflops"] = peak
    result["model_flop_utilisation"] = flops / seconds / (peak * 1e12) if peak else None
    result["sampling_vs_stock_pipeline"] = stock_sampling_ratio(components, cfg, prompts, device)
    for name, measure in (extras or {}).items():
        result[name] = measure(components, cfg, device)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result
