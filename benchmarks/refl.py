"""ReFL's training step measured, per gradient method: seconds per update by phase, peak memory, the
recomputation gradient checkpointing adds, model-FLOP utilisation, and our sampling and the comparison
harness's best-of-N sampler against the model family's stock pipeline (StableDiffusionPipeline,
StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline).

    python -m benchmarks.refl           # CUDA: SD 1.5's architecture, 512 px, batch 8, 40 DDPM steps, bf16
    python -m benchmarks.refl --set batch_size=4 --output-file benchmarks/refl_h100.json
    python -m benchmarks.refl --set model=sdxl --set batch_size=2 --output-file benchmarks/refl_sdxl_h100.json
    python -m benchmarks.refl --set model=toy --set critic=toy-clip --set batch_size=4    # CPU smoke run

The default is the issue's setting: SD 1.5's architecture at 512 px (random weights: speed does not depend
on them), batch 8, 40 DDPM steps, bf16, LoRA r4, a ViT-L-14 critic. Each method runs its costliest
gradient path in `step` as its BenchSpec pins it (refl.step.contract), so the phases compare across runs.

Every method runs without checkpointing and in each setting its BenchSpec names (the shipped methods:
their UNet recomputed by blocks or by whole calls, the VAE decoder and critic as their policy says), so the
JSON shows why the policy of refl.step.GRAD_METHODS is what it is. Counted, not timed (the same on any
machine and load; refl.counting):
- FLOPs by torch's formulas, and the forward FLOPs run with gradients on inside the UNet, VAE decoder and
  critic: a forward that checkpointing reruns in backward counts again, so their ratio to the same update's
  without checkpointing is the recomputation factor;
- the peak bytes of tensors alive at once during an update, beyond what existed before it (what
  torch.cuda.max_memory_allocated sees, without the allocator's rounding and cache), on any device.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from benchmarks.cli import parse_config, report, resolve_device
from evaluation.config import CompareConfig
from evaluation.harness import Sampler, measure_throughput
from refl.components import DTYPES, Checkpointing, ModelConfig, load_components
from refl.counting import PhaseTimer, count, recompute_ratios
from refl.lora import LoraConfig, add_lora
from refl.sampling import call_options, make_pipeline, sample, schedulers_for, unpack_latents
from refl.step import GRAD_METHODS, BenchSpec, StepConfig, grad_method, reward_step, validate_step_config
from runkit.cli import command
from runkit.config import check_mixed_precision

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name substring.
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "A10G": 70.0, "L4": 121.0}


@dataclass
class SetupConfig:
    """What a ReFL benchmark loads and which methods it runs (this command's and the memory model's)."""

    # SD model: a preset ("sd15" / "sdxl" = SD 1.5's / SDXL base's architecture, random weights; "toy",
    # "tiny-sdxl"), directory or hub id.
    model: str = "sd15"
    # Critic: an open_clip name (random weights unless "NAME:PRETRAINED") or a critic folder.
    critic: str = "ViT-L-14"
    # Compute dtype of the frozen weights and of autocast: "no" (fp32), "fp16" or "bf16"; LoRA stays fp32.
    mixed_precision: str = "bf16"
    # Gradient methods to run, keys of refl.step.GRAD_METHODS; empty = all.
    methods: list[str] = field(default_factory=list)
    # The training step every method runs (a training config's refl.step keys), with the method's costliest
    # gradient path in it pinned by its BenchSpec. Here the shipped SD 1.5 configs' (40 DDPM steps,
    # cut_range [30, 39]): refl at step 39, alignprop through the last 10, draft through draft_k, draft_lv's
    # n passes after the last.
    step: StepConfig = field(default_factory=lambda: StepConfig(scheduler="ddpm"))
    # Where it runs: "cuda", "cpu", "cuda:1", ...; "" = CUDA when there is one, else the CPU.
    device: str = ""
    # Also write the JSON result to this file ("" = print it only).
    output_file: str = ""

    def __post_init__(self):
        check_mixed_precision(self.mixed_precision, "mixed_precision")


@dataclass
class ReflBenchConfig(SetupConfig):
    # The training step every method runs, its gradient path pinned by the method's BenchSpec: here refl and
    # draft_lv at the last step, draft (draft_k) and alignprop (from cut_range's low end) through the last 5.
    step: StepConfig = field(default_factory=lambda: StepConfig(scheduler="ddpm", cut_range=[35, 39],
                                                                draft_k=5))
    # Prompts per ReFL update and per sampling call (one process).
    batch_size: int = 8
    # Timed updates per method and setting (the settings alternate update by update), after `warmup`.
    repeats: int = 3
    # Untimed updates per method and setting first (kernels, allocator, optimizer state).
    warmup: int = 1
    # Images per side for the UNet and VAE; 0 = the model's own (e.g. 128 runs SD 1.5 at 1/16 of its pixels).
    image_px: int = 0
    # Timed repeats of the two sampling comparisons (0 skips them).
    sampling_repeats: int = 3
    # Best-of-N throughput: images per harness call against the stock call (the harness's default 16).
    best_of_n_batch_size: int = 16
    # Device peak in TFLOP/s for the utilisation figure; 0 = look the device name up in PEAK_TFLOPS.
    peak_tflops: float = 0.0


# ----------------------------------------------------------------------------- what a method declares
def bench_spec(method: str) -> BenchSpec:
    """The method's BenchSpec; refuses an unknown method or one that declares none."""
    spec = grad_method(method).bench
    if spec is None:
        raise ValueError(f"gradient method {method!r} declares no BenchSpec (GradMethod.bench), so the "
                         "benchmark cannot tell where its gradient path lies; register it with one")
    return spec


def pinned_steps(cfg: SetupConfig) -> dict[str, StepConfig]:
    """Each method to run (all registered ones when cfg.methods is empty) with cfg.step, its costliest
    gradient path in it fixed by its BenchSpec. Refuses an unknown method, one without a BenchSpec and a step
    it cannot run before any model loads."""
    steps = {}
    for method in cfg.methods or list(GRAD_METHODS):
        step = replace(cfg.step, method=method)
        validate_step_config(step)
        steps[method] = bench_spec(method).pin(step)
    return steps


def settings_for(method: str) -> tuple[str, dict[str, Checkpointing]]:
    """The name of the method's own checkpointing, and the settings compared: none and its BenchSpec's."""
    spec = bench_spec(method)
    policy = GRAD_METHODS[method].checkpointing
    default = next(name for name, setting in spec.settings.items() if setting == policy)
    return default, {"none": Checkpointing(), **spec.settings}


# ----------------------------------------------------------------------------- one update
@dataclass
class Bench:
    """Loaded components, LoRA, optimizer and critic of one benchmark."""

    components: object
    params: list
    optimizer: torch.optim.Optimizer
    critic: object
    prompts: list[str]

    def watched(self) -> dict[str, torch.nn.Module]:
        """The modules counted, by the names of Checkpointing's fields ("unet": the denoiser, a flow
        model's transformer)."""
        return {"unet": self.components.denoiser, "vae_decoder": self.components.vae.decoder,
                "critic": self.critic}

    def set_checkpointing(self, policy: Checkpointing) -> None:
        self.components.set_gradient_checkpointing(policy)
        self.critic.set_grad_checkpointing(policy.critic)


def setup(cfg: SetupConfig, device: torch.device, batch_size: int, image_px: int = 0) -> Bench:
    """cfg.model with a LoRA r4 (B drawn small, not 0), cfg.critic frozen, AdamW with its moments made."""
    import reward

    dtype = DTYPES[cfg.mixed_precision]
    components = load_components(ModelConfig(name=cfg.model))
    if image_px:
        components.set_image_size(image_px)
    components.to(device, dtype)
    params = add_lora(components, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():  # B starts at 0, which would leave A without gradient and skip its kernels
        for p in params[1::2]:
            p.normal_(0.0, 1e-3)
    components.denoiser.train()
    critic = reward.load(cfg.critic, device=device).requires_grad_(False).eval()
    critic.clip.to(dtype)
    # A tiny rate: the weights barely move, so every update samples the same way.
    optimizer = torch.optim.AdamW(params, lr=1e-9)
    for p in params:  # AdamW makes its moments at its first step: before anything is counted
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    prompts = ["a photo of an astronaut riding a horse on mars"] * batch_size
    return Bench(components, params, optimizer, critic, prompts)


def update(bench: Bench, step: StepConfig, seed: int, timer: PhaseTimer | None = None) -> None:
    """One optimizer update: the reward step, backward, AdamW."""
    out = reward_step(bench.components, bench.prompts, bench.critic, step,
                      torch.Generator().manual_seed(seed), timer=timer)
    with timer("backward") if timer else contextlib.nullcontext():
        torch.autograd.backward(out["loss"])  # the call memory_model.CudaAutocastNorms takes over
    with timer("optimizer") if timer else contextlib.nullcontext():
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)


def count_update(bench: Bench, step: StepConfig, seed: int = 0, timeline: bool = False,
                 modes=()) -> dict:
    """FLOPs and tensor memory of one update under the checkpointing set on `bench` (refl.counting.count)."""
    return count(lambda timer: update(bench, step, seed, timer), bench.watched(),
                 bench.components.denoiser.device, timeline, modes)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_settings(bench: Bench, step: StepConfig, settings: dict[str, Checkpointing], cfg: ReflBenchConfig,
                  device: torch.device) -> dict[str, dict]:
    """Median seconds per phase and per update of each setting, the settings alternating update by update
    so that a shared machine's load drifts over all of them alike; CUDA's peak allocation of each."""
    rows: dict[str, list[dict]] = {name: [] for name in settings}
    peaks: dict[str, float] = {}
    for r in range(cfg.warmup + cfg.repeats):
        for name, policy in settings.items():
            bench.set_checkpointing(policy)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            timer = PhaseTimer(device)
            update(bench, step, r, timer)
            if r >= cfg.warmup:
                rows[name].append(timer.seconds)
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    out = {}
    for name, runs in rows.items():
        phases = sorted({k for row in runs for k in row})
        out[name] = {"seconds_by_phase": {k: statistics.median(row.get(k, 0.0) for row in runs)
                                          for k in phases},
                     "seconds_per_update": statistics.median(sum(row.values()) for row in runs),
                     "peak_memory_gib": peaks.get(name)}
    return out


def method_benchmark(bench: Bench, method: str, step: StepConfig, cfg: ReflBenchConfig,
                     device: torch.device) -> dict:
    """Counts and timings of one gradient method's pinned step in its settings (see the module doc)."""
    default, settings = settings_for(method)
    prefix_calls, grad_calls = bench_spec(method).calls(step)
    counts = {}
    for name, policy in settings.items():
        bench.set_checkpointing(policy)
        counts[name] = count_update(bench, step)
    timed = time_settings(bench, step, settings, cfg, device)
    result = {"default": default,
              "step": {k: getattr(step, k) for k in ("num_inference_steps", *GRAD_METHODS[method].knobs)},
              "prefix_calls": prefix_calls, "grad_calls": grad_calls, "settings": {}}
    for name, policy in settings.items():
        row = {"checkpointing": asdict(policy), **timed[name],
               "peak_tensor_gib": counts[name]["peak_tensor_bytes"] / 2**30,
               "executed_tflop": counts[name]["flops"] / 1e12,
               "recompute_ratio": recompute_ratios(counts[name], counts["none"])}
        result["settings"][name] = row
    plain = result["settings"]["none"]
    phases = plain["seconds_by_phase"]
    grad_forward = sum(phases.get(k, 0.0) for k in ("grad_step", "decode", "critic"))
    floor = phases.get("sampling", 0.0) + grad_forward + phases.get("backward", 0.0)
    ours = result["settings"][default]
    result["update_tflop"] = counts["none"]["flops"] / 1e12  # model FLOPs: nothing recomputed
    result["dominant_phase"] = max(ours["seconds_by_phase"], key=ours["seconds_by_phase"].get)
    # The floor: the no-grad prefix plus one forward and backward of the gradient path, nothing rerun.
    result["floor_seconds"] = floor
    result["default_over_floor"] = ours["seconds_per_update"] / floor
    # Time checkpointing adds, in units of one more forward of the gradient path (<= 1: at most one rerun).
    result["added_seconds_over_grad_forward"] = (ours["seconds_per_update"]
                                                 - plain["seconds_per_update"]) / grad_forward
    return result


# ----------------------------------------------------------------------------- sampling against stock
def _fastest(calls: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Seconds of each call, alternating `repeats` times after one warm-up each; the fastest of each run
    (shared machines are noisy)."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def stock_sampling_ratio(bench: Bench, cfg: ReflBenchConfig, device: torch.device) -> dict:
    """Our no-grad sampling (refl.sampling.sample, which drives the stock pipeline) against a bare
    stock pipeline call with the same sampler, steps and batch: the cost of our wrapper. Records the stock
    pipeline's class and the latents each call returned, so one sees both drew the same."""
    components, prompts = bench.components, bench.prompts
    dtype = DTYPES[cfg.mixed_precision]
    steps = cfg.step.num_inference_steps
    pipe = make_pipeline(components, cfg.step.scheduler)
    shapes = {}

    def ours():
        with components.autocast():
            shapes["ours"] = sample(pipe, prompts, generator=torch.Generator().manual_seed(0),
                                    num_inference_steps=steps, batch_size=len(prompts), output="latent").shape

    def stock():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                           generator=torch.Generator().manual_seed(0), **call_options(pipe)).images
            shapes["stock"] = unpack_latents(pipe, latents).shape  # (B, C, h, w)

    fastest = _fastest({"ours": ours, "stock": stock}, cfg.sampling_repeats, device)
    return {"pipeline": type(pipe).__name__, "num_inference_steps": steps,
            "ours_latents_shape": list(shapes["ours"]), "stock_latents_shape": list(shapes["stock"]),
            "ours_seconds": fastest["ours"], "stock_seconds": fastest["stock"],
            "ratio": fastest["ours"] / fastest["stock"]}


def best_of_n_throughput(components, cfg: ReflBenchConfig, device: torch.device) -> dict:
    """The comparison harness's best-of-N sampler against stock `pipe(prompt=[p] * B)`, CFG 7.5, base model
    (evaluation.harness.measure_throughput), with the stock pipeline's class; the harness's sampler, DDIM
    (the flow families: their Euler sampler)."""
    harness = CompareConfig(model=ModelConfig(name=cfg.model), n_samples=64,
                            batch_size=cfg.best_of_n_batch_size,
                            num_inference_steps=cfg.step.num_inference_steps, guidance_scale=7.5,
                            scheduler=schedulers_for(components)[0], device=str(device),
                            mixed_precision=cfg.mixed_precision)
    sampler = Sampler(harness, components)
    measured = measure_throughput(sampler, "a photo of an astronaut riding a horse",
                                  repeats=cfg.sampling_repeats)
    return {"pipeline": type(sampler.pipe).__name__, **measured}


# ----------------------------------------------------------------------------- the benchmark
def peak_tflops(cfg: ReflBenchConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def describe_device(device: torch.device) -> dict:
    """The machine a measurement comes from: name, threads, and the CPU load while it ran."""
    out = {"type": device.type, "threads": torch.get_num_threads(),
           "load_average_1_5_15": list(os.getloadavg())}
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                             model)
        out["name"] = model
        out["cpus"] = os.cpu_count()
    return out


def run_benchmark(cfg: ReflBenchConfig) -> dict:
    """Every measurement of the module docstring, as one dict."""
    device = resolve_device(cfg.device, cfg.mixed_precision)
    steps = pinned_steps(cfg)
    bench = setup(cfg, device, cfg.batch_size, cfg.image_px)
    result = {"config": asdict(cfg), "device": describe_device(device), "torch": torch.__version__,
              "image_px": bench.components.image_size, "methods": {}}
    peak = peak_tflops(cfg, device)
    result["peak_tflops"] = peak
    for method, step in steps.items():
        row = method_benchmark(bench, method, step, cfg, device)
        seconds = row["settings"]["none"]["seconds_per_update"]
        row["achieved_tflops"] = row["update_tflop"] / seconds
        row["model_flop_utilisation"] = row["update_tflop"] / seconds / peak if peak else None
        result["methods"][method] = row
    if cfg.sampling_repeats:
        result["sampling_vs_stock_pipeline"] = stock_sampling_ratio(bench, cfg, device)
        result["best_of_n_vs_stock_pipeline"] = best_of_n_throughput(bench.components, cfg, device)
    result["device"]["load_average_after"] = list(os.getloadavg())
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


@command
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ReflBenchConfig, __doc__, argv, one_cpu_thread=True)
    report(run_benchmark(cfg), cfg.output_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
