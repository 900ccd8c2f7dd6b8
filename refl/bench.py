"""ReFL's training step measured, per gradient method: seconds per update by phase, peak memory, the
recomputation gradient checkpointing adds, model-FLOP utilisation, and our sampling against a stock
StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL: `--set model=sdxl`); and a model of SD 1.5's
memory at 512 px from counts at small resolutions.

`run_benchmark(BenchConfig(...))` returns one JSON-able dict; `scripts/bench_refl.py` adds the
comparison harness's best-of-N sampler (evaluation.harness.best_of_n_throughput), prints it and
writes it under benchmarks/. On CUDA the default is the issue's setting: SD 1.5's architecture at
512 px (random weights: speed does not depend on them), batch 8, 40 DDPM steps, bf16, LoRA r4, a
ViT-L-14 critic. On a CPU it runs the toy preset so the script itself stays tested.

Every method runs in three settings: without checkpointing, and with its UNet recomputed by blocks or
by whole calls (the VAE decoder and critic as its policy says), so the JSON shows why the policy of
refl.step.GRAD_METHODS is what it is. Counted, not timed (the same on any machine and load):
- FLOPs by torch's formulas (torch.utils.flop_counter), and the forward FLOPs run with gradients on
  inside the UNet, VAE decoder and critic: a forward that checkpointing reruns in backward counts again,
  so their ratio to the same update's without checkpointing is the recomputation factor;
- the peak bytes of tensors alive at once during an update, beyond what existed before it (what
  torch.cuda.max_memory_allocated sees, without the allocator's rounding and cache), on any device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from refl.components import DTYPES, Checkpointing, ModelConfig, load_components
from refl.counting import FlopCount, PhaseTimer, TensorMemory
from refl.lora import LoraConfig, add_lora
from refl.step import GRAD_METHODS, StepConfig, reward_step

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name substring.
PEAK_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4,
               "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2, "RTX 3090": 71.0, "A10G": 70.0, "L4": 121.0}

@dataclass
class BenchConfig:
    # SD model: a preset ("sd15" / "sdxl" = SD 1.5's / SDXL base's architecture, random weights; "toy",
    # "tiny-sdxl"), directory or hub id.
    model: str = "sd15"
    # Critic: an open_clip name (random weights unless "name:pretrained") or a critic directory.
    critic: str = "ViT-L-14"
    # Prompts per ReFL update and per sampling call (one process).
    batch: int = 8
    # Sampler steps per trajectory; the cut is fixed so phases compare across runs and methods.
    steps: int = 40
    # Training sampler: "ddpm" (ImageReward's) or "ddim".
    scheduler: str = "ddpm"
    # Classifier-free guidance scale of the training trajectory (<= 1: off, as ReFL trains).
    guidance_scale: float = 1.0
    # Weights and autocast dtype: "bf16", "fp16" or "fp32".
    dtype: str = "bf16"
    # Gradient methods to run, keys of refl.step.GRAD_METHODS; empty = all.
    methods: list[str] = field(default_factory=list)
    # Steps with gradient of draft (K) and alignprop (from the cut to the end); refl and draft_lv take
    # theirs at the last step.
    grad_steps: int = 5
    # Timed updates per method and setting (the settings alternate update by update), after `warmup`.
    repeats: int = 3
    # Untimed updates per method and setting first (kernels, allocator, optimizer state).
    warmup: int = 1
    # Images per side for the UNet and VAE; 0 = the model's own (e.g. 128 runs SD 1.5 at 1/16 of its pixels).
    image_px: int = 0
    # Timed repeats of the two sampling comparisons (0 skips them).
    sampling_repeats: int = 3
    # Best-of-N throughput: images per harness batch against the stock call (the harness's default 16).
    best_of_batch: int = 16
    # Device peak in TFLOP/s for the utilisation figure; 0 = look the device name up in PEAK_TFLOPS.
    peak_tflops: float = 0.0


# ----------------------------------------------------------------------------- counting
class CudaAutocastNorms(TorchFunctionMode):
    """CUDA's autocast runs group_norm and layer_norm in fp32 (inputs and output); CPU autocast keeps them in
    bf16. Inside this mode a CPU run stores what a CUDA run would, for the memory model."""

    NORMS = (F.group_norm, F.layer_norm)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.NORMS and torch.is_autocast_enabled("cpu"):
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            kw = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*up, **kw)
        if func is torch.autograd.backward and len(args) == 1 and not any(kwargs.values()):
            # A mode is off inside its own handler, yet the forwards checkpointing reruns in backward must
            # store what CUDA's would too: the engine runs with the mode back on (a scalar loss, as
            # `update`'s).
            (loss,) = args[0] if isinstance(args[0], (tuple, list)) else args
            with self:
                torch.autograd.graph._engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                                                          allow_unreachable=True, accumulate_grad=True)
            return None
        return func(*args, **kwargs)


class BroadcastBmmAsMm(TorchDispatchMode):
    """A bf16 bmm whose second operand is broadcast over the batch (stride 0: a linear layer applied to a
    non-contiguous (L, B, D) input, as torch's multi-head attention does for batch > 1) runs a naive CPU
    kernel, 170 s of a 250 s SD 1.5 update at 64 px; it is one mm. Same values, shape and dtype; enter it
    before the counting modes, so they see the bmm."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten.bmm.default and args[1].stride(0) == 0 and args[0].device.type == "cpu":
            a, b = args
            return torch.mm(a.reshape(-1, a.shape[-1]), b[0]).view(a.shape[0], a.shape[1], b.shape[-1])
        return func(*args, **(kwargs or {}))


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
        return {"unet": self.components.unet, "vae_decoder": self.components.vae.decoder,
                "critic": self.critic}

    def set_checkpointing(self, policy: Checkpointing) -> None:
        self.components.set_gradient_checkpointing(policy)
        self.critic.set_grad_checkpointing(policy.critic)


def setup(cfg: BenchConfig, device: torch.device) -> Bench:
    import reward

    dtype = DTYPES[cfg.dtype]
    components = load_components(ModelConfig(name=cfg.model))
    if cfg.image_px:
        set_image_px(components, cfg.image_px)
    components.to(device, dtype)
    params = add_lora(components, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():  # B starts at 0, which would leave A without gradient and skip its kernels
        for p in params[1::2]:
            p.normal_(0.0, 1e-3)
    components.unet.train()
    critic = reward.load(cfg.critic, device=device).requires_grad_(False).eval()
    critic.clip.to(dtype)
    # A tiny rate: the weights barely move, so every update samples the same way.
    optimizer = torch.optim.AdamW(params, lr=1e-9)
    for p in params:  # AdamW makes its moments at its first step: before anything is counted
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    prompts = ["a photo of an astronaut riding a horse on mars"] * cfg.batch
    return Bench(components, params, optimizer, critic, prompts)


def set_image_px(components, px: int) -> None:
    """Generate px x px images: the latents' side is what the UNet's config says (initial_latents)."""
    unit = 2 ** (len(components.unet.config.block_out_channels) - 1) * components.vae_scale
    if px % unit:
        raise ValueError(f"image_px={px} must be a multiple of {unit} (the UNet halves its latents "
                         f"{len(components.unet.config.block_out_channels) - 1} times)")
    components.unet.register_to_config(sample_size=px // components.vae_scale)


def step_config(cfg: BenchConfig, method: str) -> StepConfig:
    """The method's step with a fixed cut: refl, draft_lv at the last step, draft and alignprop through
    the last `grad_steps` steps."""
    k = min(cfg.grad_steps, cfg.steps)
    cut = {"alignprop": cfg.steps - k}.get(method, cfg.steps - 1)
    return StepConfig(method=method, scheduler=cfg.scheduler, num_inference_steps=cfg.steps,
                      cut_range=[cut, cut], draft_k=k, guidance_scale=cfg.guidance_scale)


def update(bench: Bench, step: StepConfig, seed: int, timer: PhaseTimer | None = None) -> None:
    """One optimizer update: the reward step, backward, AdamW."""
    out = reward_step(bench.components, bench.prompts, bench.critic, step,
                      torch.Generator().manual_seed(seed), timer=timer)
    with timer("backward") if timer else contextlib.nullcontext():
        torch.autograd.backward(out["loss"])  # the call CudaAutocastNorms takes over
    with timer("optimizer") if timer else contextlib.nullcontext():
        bench.optimizer.step()
        bench.optimizer.zero_grad(set_to_none=True)


def count_update(bench: Bench, step: StepConfig, seed: int = 0, timeline: bool = False,
                 as_on_cuda: bool = False) -> dict:
    """FLOPs and tensor memory of one update under the checkpointing set on `bench` (see the module doc).
    as_on_cuda: on a CPU, store norms as CUDA's autocast would and skip a slow CPU kernel (the memory
    model)."""
    flops = FlopCount(bench.watched())
    timer = PhaseTimer(bench.components.unet.device)

    # the phase, and inside it the watched module running a forward (a rerun, in backward)
    def where() -> str:
        return (timer.current or "") + (f"/{flops.running}" if flops.running else "")

    memory = TensorMemory(timeline, where if timeline else None)
    cuda = as_on_cuda and bench.components.unet.device.type == "cpu"
    with BroadcastBmmAsMm() if cuda else contextlib.nullcontext(), flops, memory, \
            CudaAutocastNorms() if cuda else contextlib.nullcontext():
        update(bench, step, seed, timer)
    out = {"flops": flops.total, "forward_flops": flops.forward, "grad_forwards": flops.grad_forwards,
           "peak_tensor_bytes": memory.peak}
    if timeline:
        out["timeline"], out["ops"], out["places"] = memory.timeline, memory.ops, memory.places
    return out


def recompute_ratios(counted: dict, plain: dict) -> dict[str, float]:
    """Forward FLOPs with gradients on, per watched module and in all, over those without checkpointing."""
    ratios = {name: entry["grad"] / plain["forward_flops"][name]["grad"]
              for name, entry in counted["forward_flops"].items() if plain["forward_flops"][name]["grad"]}
    ratios["all"] = (sum(e["grad"] for e in counted["forward_flops"].values())
                     / sum(e["grad"] for e in plain["forward_flops"].values()))
    return ratios


def settings_for(method: str) -> tuple[str, dict[str, Checkpointing]]:
    """The method's default UNet granularity, and the three settings the benchmark compares."""
    policy = GRAD_METHODS[method].checkpointing
    return policy.unet, {"none": Checkpointing(), "blocks": dataclasses.replace(policy, unet="blocks"),
                         "calls": dataclasses.replace(policy, unet="calls")}


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_settings(bench: Bench, step: StepConfig, settings: dict[str, Checkpointing], cfg: BenchConfig,
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


def method_benchmark(bench: Bench, method: str, cfg: BenchConfig, device: torch.device) -> dict:
    """Counts and timings of one gradient method in its three settings (see the module doc)."""
    default, settings = settings_for(method)
    step = step_config(cfg, method)
    counts = {}
    for name, policy in settings.items():
        bench.set_checkpointing(policy)
        counts[name] = count_update(bench, step)
    timed = time_settings(bench, step, settings, cfg, device)
    result = {"default": default, "step": {k: v for k, v in asdict(step).items()
                                           if k in ("num_inference_steps", "cut_range", "draft_k",
                                                    "draft_lv_n")},
              "settings": {}}
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


# ----------------------------------------------------------------------------- the benchmark
def stock_sampling_ratio(bench: Bench, cfg: BenchConfig, device) -> dict:
    """Our no-grad sampling (refl.sampling.sample, which drives the stock pipeline) against a bare
    stock pipeline call with the same sampler, steps and batch: the cost of our wrapper."""
    from refl.sampling import make_pipeline, sample

    components, prompts = bench.components, bench.prompts
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
    for _ in range(cfg.sampling_repeats):  # alternating, fastest of each: shared machines are noisy
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


def run_benchmark(cfg: BenchConfig, device: torch.device | None = None,
                  extras: dict[str,
                               Callable[[object, BenchConfig, torch.device], dict]] | None = None) -> dict:
    """Every measurement of the module docstring, as one dict. `extras`: further timings of the same loaded
    components, `name -> fn(components, cfg, device)`, from layers above refl/ (scripts/bench_refl.py adds
    the comparison harness's best-of-N sampler this way, since refl/ may not import evaluation/)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    methods = cfg.methods or list(GRAD_METHODS)
    unknown = sorted(set(methods) - set(GRAD_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(GRAD_METHODS)}")
    bench = setup(cfg, device)
    result = {"config": asdict(cfg), "device": describe_device(device), "torch": torch.__version__,
              "image_px": bench.components.image_size, "methods": {}}
    peak = peak_tflops(cfg, device)
    result["peak_tflops"] = peak
    for method in methods:
        row = method_benchmark(bench, method, cfg, device)
        seconds = row["settings"]["none"]["seconds_per_update"]
        row["achieved_tflops"] = row["update_tflop"] / seconds
        row["model_flop_utilisation"] = row["update_tflop"] / seconds / peak if peak else None
        result["methods"][method] = row
    if cfg.sampling_repeats:
        result["sampling_vs_stock_pipeline"] = stock_sampling_ratio(bench, cfg, device)
        for name, measure in (extras or {}).items():
            result[name] = measure(bench.components, cfg, device)
    result["device"]["load_average_after"] = list(os.getloadavg())
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


# ----------------------------------------------------------------------------- SD 1.5 at 512 px, modelled
@dataclass
class MemoryModelConfig:
    """What the memory model predicts for, and the resolutions it counts at (BenchConfig gives the model,
    critic, dtype, methods and scheduler)."""

    # Images per side the table is for.
    target_px: int = 512
    # Prompts per micro-batch in the table.
    batches: list[int] = field(default_factory=lambda: [1, 2, 4])
    # Sampler steps of a trajectory (the shipped SD 1.5 configs: 40) ...
    steps: int = 40
    # ... and AlignProp's worst case of their cut_range [30, 39]: gradient through the last 10 steps.
    alignprop_grad_steps: int = 10
    # Counted resolutions (multiples of 64 for SD 1.5): memory is fitted at the first two (and a second batch
    # at the first) and checked at the third, FLOPs fitted through all three.
    points_px: list[int] = field(default_factory=lambda: [64, 128, 192])
    # Sustained throughput the seconds assume (a parameter of the model, not a measurement).
    sustained_tflops: float = 100.0


def _model_step(method: str, k: int, scheduler: str) -> StepConfig:
    """The method's gradient path after one no-grad call (memory does not depend on the prefix's length)."""
    steps = {"alignprop": k + 1, "draft_lv": 1}.get(method, 2)
    cut = min(1, steps - 1)
    return StepConfig(method=method, scheduler=scheduler, num_inference_steps=steps, cut_range=[cut, cut])


def _prefix_calls(method: str, m: MemoryModelConfig) -> int:
    """No-grad UNet calls before the gradient path in the table's trajectory (refl and draft at the last
    step)."""
    return {"alignprop": m.steps - m.alignprop_grad_steps, "draft_lv": m.steps}.get(method, m.steps - 1)


def static_bytes(bench: Bench) -> dict[str, int]:
    """Bytes that live through the whole run: frozen weights, LoRA tensors and AdamW's two moments."""
    def size(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    c = bench.components
    lora = sum(p.numel() * p.element_size() for p in bench.params)
    return {"unet_vae_text_encoder": sum(size(m) for m in c.modules().values()) - lora,
            "critic": size(bench.critic), "lora": lora, "adamw_moments": 2 * lora}


def _matched_ops(a: list[int], b: list[int], window: int = 64, run: int = 8) -> dict[int, int]:
    """Index in `b` of each op of `a` they share, for two op sequences that differ in a few scattered ops:
    walk both, and where they part, resume at the nearest place where `run` ops agree again."""
    i = j = 0
    pairs: dict[int, int] = {}
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            pairs[i] = j
            i, j = i + 1, j + 1
            continue
        skip = next(((di, d - di) for d in range(1, window) for di in range(d + 1)
                     if a[i + di:i + di + run] == b[j + d - di:j + d - di + run] and i + di < len(a)), None)
        if skip is None:
            raise RuntimeError(f"the counted updates part at op {i} and do not meet again within {window} "
                               "ops; the memory model needs the same computation at every size")
        i, j = i + skip[0], j + skip[1]
    return pairs


def _aligned_timelines(runs: list[dict]) -> tuple[list[np.ndarray], list[int]]:
    """The live bytes of each run at the ops every run shares, in order, and those ops' indices in the first
    run. Batch sizes may run a few ops more or less (a clone, a view); ops are matched by name."""
    ids: dict = {}
    seqs = [[ids.setdefault(op, len(ids)) for op in r["ops"]] for r in runs]
    pairs = [_matched_ops(seqs[0], seq) for seq in seqs[1:]]
    first = sorted(set.intersection(*(set(p) for p in pairs)))
    if len(first) < 0.99 * len(seqs[0]):
        raise RuntimeError(f"the counted updates share only {len(first)} of {len(seqs[0])} ops; the memory "
                           "model needs the same computation at every size")
    out = [np.asarray(runs[0]["timeline"], dtype=np.float64)[first]]
    for r, mapping in zip(runs[1:], pairs):
        out.append(np.asarray(r["timeline"], dtype=np.float64)[[mapping[i] for i in first]])
    return out, first


def memory_model(cfg: BenchConfig, m: MemoryModelConfig, device: torch.device | None = None) -> dict:
    """Peak memory and FLOPs of an update of cfg.model at m.target_px, from counts on this device at the
    small resolutions m.points_px, stored as a CUDA run would store them (count_update's as_on_cuda).

    Rule: every tensor's size is c + B (a + b s) in the batch B and pixel count s = px^2 (activations of
    convolutions, linear layers and flash/memory-efficient attention grow with s; text and critic tensors,
    the critic resizing to its own size, do not; LoRA gradients depend on neither), and the update runs the
    same ops at every size, so the live bytes after op i are c_i + B (a_i + b_i s). Three counts fix them
    per op: (px0, B=2), (px1, B=2), (px0, B=3) (batch 1 runs some matmuls as mm rather than bmm, other ops);
    the peak at the target is the largest over ops, and a fourth count (px2, B=1) checks the fit in both
    directions. FLOPs per image are a + b s + c s^2 (self-attention is quadratic in s), through px0, px1,
    px2; seconds are FLOPs / m.sustained_tflops. Static bytes (weights, LoRA, AdamW moments) are added."""
    device = device or torch.device("cpu")
    methods = cfg.methods or list(GRAD_METHODS)
    p0, p1, p2 = m.points_px
    bench = setup(dataclasses.replace(cfg, batch=1, image_px=p0), device)
    s0, s1, s2, target = (float(px**2) for px in (p0, p1, p2, m.target_px))
    static = static_bytes(bench)
    fixed = sum(static.values())
    out = {"config": asdict(cfg), "model": asdict(m), "measured_on": describe_device(device),
           "torch": torch.__version__, "static_gib": {k: v / 2**30 for k, v in static.items()}, "methods": {}}

    def count(step, px, batch):
        set_image_px(bench.components, px)
        bench.prompts = bench.prompts[:1] * batch
        return count_update(bench, step, timeline=True, as_on_cuda=True)

    for method in methods:
        default, settings = settings_for(method)
        step = _model_step(method, m.alignprop_grad_steps, cfg.scheduler)
        rows, unet_grad = {}, {}
        for name, policy in settings.items():
            bench.set_checkpointing(policy)
            runs = {(p0, 2): count(step, p0, 2), (p1, 2): count(step, p1, 2), (p0, 3): count(step, p0, 3),
                    (p2, 1): count(step, p2, 1)}
            fitted = [(p0, 2), (p1, 2), (p0, 3)]
            aligned, ops = _aligned_timelines([runs[k] for k in fitted])
            lines = dict(zip(fitted, aligned))
            b = (lines[p1, 2] - lines[p0, 2]) / (2 * (s1 - s0))
            per_image_at_s0 = lines[p0, 3] - lines[p0, 2]  # a + b s0
            c = lines[p0, 2] - 2 * per_image_at_s0

            def live(s_, batch, b=b, c=c, per_image_at_s0=per_image_at_s0):
                return c + batch * (per_image_at_s0 + b * (s_ - s0))

            def peak(s_, batch):
                return float(live(s_, batch).max())

            places = runs[p0, 2]["places"]

            flop_points = [runs[p0, 2]["flops"] / 2, runs[p1, 2]["flops"] / 2, runs[p2, 1]["flops"]]
            flops = float(np.polyval(np.polyfit([s0, s1, s2], flop_points, 2), target))
            call_points = [runs[p0, 2]["forward_flops"]["unet"]["no_grad"] / 2,
                           runs[p1, 2]["forward_flops"]["unet"]["no_grad"] / 2,
                           runs[p2, 1]["forward_flops"]["unet"]["no_grad"]]
            no_grad_call = float(np.polyval(np.polyfit([s0, s1, s2], call_points, 2), target))
            # The measured update ran one no-grad call; the table's trajectory runs prefix_calls of them.
            flops += (_prefix_calls(method, m) - 1) * no_grad_call
            unet_grad[name] = runs[p2, 1]["forward_flops"]["unet"]["grad"]
            rows[name] = {
                "checkpointing": asdict(policy),
                "measured_peak_tensor_gib": {f"{px}px_batch{bs}": r["peak_tensor_bytes"] / 2**30
                                             for (px, bs), r in runs.items()},
                "check": f"{p2}px_batch1",
                "check_predicted_over_measured": peak(s2, 1) / runs[p2, 1]["peak_tensor_bytes"],
                "peak_gib": {str(bs): (fixed + peak(target, bs)) / 2**30 for bs in m.batches},
                # Where the largest batch peaks: the phase, and the module whose forward reruns there.
                "peak_at": places[ops[int(np.argmax(live(target, m.batches[-1])))]],
                "tflop_per_image": flops / 1e12,
                "seconds_per_update": {str(bs): bs * flops / 1e12 / m.sustained_tflops for bs in m.batches},
            }
        for name, row in rows.items():
            row["recompute_ratio_unet"] = unet_grad[name] / unet_grad["none"]
        out["methods"][method] = {"default": default, "prefix_calls": _prefix_calls(method, m),
                                  "grad_calls": {"alignprop": m.alignprop_grad_steps,
                                                 "draft_lv": 2}.get(method, 1),
                                  "settings": rows}
    out["table_markdown"] = model_table_markdown(out)
    return out


def extend_memory_model(earlier: dict, new: dict) -> dict:
    """`earlier`'s methods plus `new`'s (which win), when both modelled the same thing the same way."""
    same = ("model", "torch")
    if any(earlier.get(k) != new.get(k) for k in same) \
            or {k: v for k, v in earlier["config"].items() if k != "methods"} \
            != {k: v for k, v in new["config"].items() if k != "methods"}:
        raise ValueError("the model to extend was made with other settings; write a new file instead")
    methods = {**earlier["methods"], **new["methods"]}
    order = [*GRAD_METHODS, *sorted(set(methods) - set(GRAD_METHODS))]
    merged = {**new, "methods": {k: methods[k] for k in order if k in methods}}
    merged["config"] = {**new["config"], "methods": list(merged["methods"])}
    merged["measured_on"] = [*([earlier["measured_on"]] if isinstance(earlier["measured_on"], dict)
                               else earlier["measured_on"]), new["measured_on"]]
    merged["table_markdown"] = model_table_markdown(merged)
    return merged


def model_table_markdown(model: dict) -> str:
    """The memory model as a README table: one row per method and setting, the method's default in bold."""
    batches = model["model"]["batches"]
    head = ("| method | recomputed in backward | "
            + " | ".join(f"peak GiB, batch {b}" for b in batches) + " | "
            + " | ".join(f"s/update, batch {b}" for b in batches) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(batches))]
    what = {"none": "nothing (`gradient_checkpointing: false`)", "blocks": "UNet blocks, VAE decoder, critic",
            "calls": "UNet calls whole, VAE decoder, critic"}
    for method, entry in model["methods"].items():
        for name in ("none", "blocks", "calls"):
            row = entry["settings"][name]
            label = f"**{what[name]}** (`true`)" if name == entry["default"] else what[name]
            lines.append(f"| {method} | {label} | "
                         + " | ".join(f"{row['peak_gib'][str(b)]:.1f}" for b in batches) + " | "
                         + " | ".join(f"{row['seconds_per_update'][str(b)]:.2f}" for b in batches) + " |")
    return "\n".join(lines)
