"""A model of a ReFL update's peak memory and seconds at full size (SD 1.5 at 512 px by default), from
tensor-byte and FLOP counts at small resolutions on this machine, per gradient method and checkpointing
setting; a model, not a measurement.

    python -m benchmarks.memory_model --set 'methods=[refl]' \\
        --output-file benchmarks/refl_sd15_memory_model.json
    python -m benchmarks.memory_model --set 'methods=[draft]' --set extend=true \\
        --output-file benchmarks/refl_sd15_memory_model.json   # one method per process: short CPU runs
    python -m benchmarks.memory_model --set model=sdxl --set target_px=1024 --set 'batch_sizes=[1,2]' \\
        --set 'methods=[refl]' --output-file benchmarks/refl_sdxl_memory_model.json

Each method runs its costliest gradient path in `step` (the shipped SD 1.5 configs': 40 DDPM steps,
cut_range [30, 39]) as its BenchSpec pins it, after a no-grad prefix shortened to one UNet call (memory does
not depend on the prefix's length; its FLOPs are added per call). The rule is memory_model's docstring.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.cli import parse_config, report, resolve_device
from benchmarks.meta_device import CudaAutocastOnMeta, MetaValues, backward_with_mode_on
from benchmarks.refl import (
    Bench,
    SetupConfig,
    bench_spec,
    count_update,
    describe_device,
    pinned_steps,
    settings_for,
    setup,
    update,
)
from refl.components import (
    ARCHITECTURES,
    DTYPES,
    FLOW_FAMILIES,
    FLOW_PRESETS,
    PRESETS,
    build_architecture,
    build_flow_preset,
    build_preset,
)
from refl.counting import count
from refl.lora import LoraConfig, add_lora
from refl.step import GRAD_METHODS, BenchSpec, StepConfig, checkpointing_for
from refl.text_embeddings import precompute_text_embeddings, precompute_wanted
from runkit.cli import command

aten = torch.ops.aten


@dataclass
class MemoryModelConfig(SetupConfig):
    """The memory model's settings; its `step` (SetupConfig's) needs kl_weight 0."""

    # Images per side the table is for.
    target_px: int = 512
    # Prompts per micro-batch in the table.
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    # Counted resolutions (multiples of 64 for SD 1.5): memory is fitted at the first two (and a second batch
    # at the first) and checked at the third, FLOPs fitted through all three.
    points_px: list[int] = field(default_factory=lambda: [64, 128, 192])
    # Sustained throughput the seconds assume (a parameter of the model, not a measurement).
    sustained_tflops: float = 100.0
    # Add these methods to the model already in output_file (made with the same settings) instead of
    # replacing it.
    extend: bool = False
    # device "meta", a flow model: count its transformer with 2 and with 3 blocks of each kind it repeats,
    # at batch 1 and 2, and extrapolate linearly to its full depth and to batch_sizes (each phase's peak
    # bytes and the FLOPs); false: count the full model at every batch size. Several times faster on a deep
    # transformer; the two agree on SD 3.5 medium in docs/flow.md.
    extrapolate_depth: bool = False


# ----------------------------------------------------------------------------- a CPU run stored as on CUDA
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
        if func is torch.autograd.backward and backward_with_mode_on(self, args, kwargs):
            return None  # the forwards that checkpointing reruns in backward store what CUDA's would too
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


# ----------------------------------------------------------------------------- the model
def shortened(step: StepConfig, spec: BenchSpec) -> StepConfig:
    """`step` (pinned) with its no-grad prefix made one UNet call, the gradient path kept: the trajectory
    and its cut move by the same number of steps."""
    prefix, grad = spec.calls(step)
    d = prefix - 1
    short = replace(step, num_inference_steps=step.num_inference_steps - d,
                    cut_range=[c - d for c in step.cut_range])
    if spec.calls(short) != (1, grad):
        raise ValueError(f"gradient method {step.method!r}: {d} steps fewer give UNet calls "
                         f"{spec.calls(short)} (no grad, grad), not (1, {grad}); the memory model needs a "
                         "gradient path that ends the trajectory")
    return short


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


def memory_model(cfg: MemoryModelConfig) -> dict:
    """Peak memory and FLOPs of an update of cfg.model at cfg.target_px, from counts on cfg.device at the
    small resolutions cfg.points_px, stored as a CUDA run would store them (on a CPU: CudaAutocastNorms);
    on the meta device (`device: meta`) counted at cfg.target_px itself (`meta_memory_model`).

    Rule: every tensor's size is c + B (a + b s) in the batch B and pixel count s = px^2 (activations of
    convolutions, linear layers and flash/memory-efficient attention grow with s; text and critic tensors,
    the critic resizing to its own size, do not; LoRA gradients depend on neither), and the update runs the
    same ops at every size, so the live bytes after op i are c_i + B (a_i + b_i s). Three counts fix them
    per op: (px0, B=2), (px1, B=2), (px0, B=3) (batch 1 runs some matmuls as mm rather than bmm, other ops);
    the peak at the target is the largest over ops, and a fourth count (px2, B=1) checks the fit in both
    directions. FLOPs per image are a + b s + c s^2 (self-attention is quadratic in s), through px0, px1,
    px2; seconds are FLOPs / cfg.sustained_tflops. Static bytes (weights, LoRA, AdamW moments) are added."""
    if cfg.step.kl_weight > 0:
        raise ValueError("step.kl_weight must be 0 for the memory model: its base-model calls would be "
                         "extrapolated as no-grad prefix calls")
    device = resolve_device(cfg.device)
    # method -> (its pinned step, the same after a one-call prefix), refused before any model loads
    steps = {method: (full, shortened(full, bench_spec(method)))
             for method, full in pinned_steps(cfg).items()}
    if device.type == "meta":
        return meta_memory_model(cfg, steps)
    p0, p1, p2 = cfg.points_px
    bench = setup(cfg, device, batch_size=1, image_px=p0)
    s0, s1, s2, target = (float(px**2) for px in (p0, p1, p2, cfg.target_px))
    static = static_bytes(bench)
    fixed = sum(static.values())
    out = {"config": asdict(cfg), "measured_on": describe_device(device), "torch": torch.__version__,
           "static_gib": {k: v / 2**30 for k, v in static.items()}, "methods": {}}

    def count(step, px, batch):
        bench.components.set_image_size(px)
        bench.prompts = bench.prompts[:1] * batch
        modes = (BroadcastBmmAsMm(), CudaAutocastNorms()) if device.type == "cpu" else ()
        return count_update(bench, step, timeline=True, modes=modes)

    for method, (full, step) in steps.items():
        default, settings = settings_for(method)
        prefix_calls, grad_calls = bench_spec(method).calls(full)
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
            # The measured update ran one no-grad call; the modelled trajectory runs prefix_calls of them.
            flops += (prefix_calls - 1) * no_grad_call
            unet_grad[name] = runs[p2, 1]["forward_flops"]["unet"]["grad"]
            rows[name] = {
                "checkpointing": asdict(policy),
                "measured_peak_tensor_gib": {f"{px}px_batch{bs}": r["peak_tensor_bytes"] / 2**30
                                             for (px, bs), r in runs.items()},
                "check": f"{p2}px_batch1",
                "check_predicted_over_measured": peak(s2, 1) / runs[p2, 1]["peak_tensor_bytes"],
                "peak_gib": {str(bs): (fixed + peak(target, bs)) / 2**30 for bs in cfg.batch_sizes},
                # Where the largest batch peaks: the phase, and the module whose forward reruns there.
                "peak_at": places[ops[int(np.argmax(live(target, cfg.batch_sizes[-1])))]],
                "tflop_per_image": flops / 1e12,
                "seconds_per_update": {str(bs): bs * flops / 1e12 / cfg.sustained_tflops
                                       for bs in cfg.batch_sizes},
            }
        for name, row in rows.items():
            row["recompute_ratio_unet"] = unet_grad[name] / unet_grad["none"]
        out["methods"][method] = {"default": default, "prefix_calls": prefix_calls, "grad_calls": grad_calls,
                                  "settings": rows}
    out["table_markdown"] = model_table_markdown(out)
    return out


# ----------------------------------------------------------------------------- on the meta device
@dataclass
class MetaBench(Bench):
    """A Bench on the meta device (benchmarks.meta_device), its denoiser a UNet or a transformer."""

    values: MetaValues = field(default_factory=MetaValues)  # the small tensors' values (meta_device)
    text_encoders_freed: dict[str, int] = field(default_factory=dict)  # bytes, by diffusers name

    def watched(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.components.denoiser, "vae_decoder": self.components.vae.decoder,
                "critic": self.critic}


# Blocks of each kind in the smaller of the two counted copies (extrapolate_depth): from 3 on, the first
# blocks backward recomputes are those of a deep model (the last, which keeps no text stream in SD 3, then
# plain ones), so each phase's peak grows by the same bytes per block.
BASE_BLOCKS = 3


def transformer_blocks(config) -> dict[str, int]:
    """The kinds of block a flow transformer repeats and how many of each, keyed as `blocks_overrides` reads
    them: FLUX's two-stream and single-stream blocks; SD 3.5 medium's MMDiT-X blocks (a second attention
    over the image) and its plain joint blocks after them; SD 3's and 3.5 large's joint blocks."""
    if "num_single_layers" in config:
        return {"num_layers": config["num_layers"], "num_single_layers": config["num_single_layers"]}
    dual = len(config.get("dual_attention_layers") or ())
    if not dual:
        return {"num_layers": config["num_layers"]}
    return {"dual": dual, "joint": config["num_layers"] - dual}


def blocks_overrides(counts: dict[str, int]) -> dict:
    """Transformer config keys for `counts` blocks of each kind (transformer_blocks' keys)."""
    if "dual" in counts:
        return {"num_layers": counts["dual"] + counts["joint"],
                "dual_attention_layers": list(range(counts["dual"]))}
    return dict(counts)


def _build_on_meta(model: str, dtype: torch.dtype, blocks: dict[str, int] | None):
    if model in ARCHITECTURES:
        return build_architecture(model, device="meta", dtype=dtype,
                                  transformer_overrides=blocks_overrides(blocks) if blocks else None)
    if model in PRESETS or model in FLOW_PRESETS:  # the tests' small models
        spec = None
        if blocks:  # a flow preset's block counts: FlowPresetSpec.layers / single_layers
            spec = replace(FLOW_PRESETS[model], layers=blocks["num_layers"],
                           single_layers=blocks.get("num_single_layers", 0))
        with torch.device("meta"):
            components = build_preset(model) if model in PRESETS else build_flow_preset(model, spec=spec)
        return components.to("meta", dtype)
    names = sorted(ARCHITECTURES) + sorted(PRESETS) + sorted(FLOW_PRESETS)
    raise ValueError(f"device=meta builds a shipped architecture or a preset: model must be one of {names}, "
                     f"got {model!r}")


def meta_setup(cfg: MemoryModelConfig, blocks: dict[str, int] | None = None) -> MetaBench:
    """cfg.model's architecture (with `blocks` transformer blocks of each kind, when given) built on the meta
    device in cfg.mixed_precision at cfg.target_px, its prompt embeddings computed once and text encoders
    freed where training does that (SD 3, FLUX: refl.text_embeddings), a LoRA r4 (B drawn small, not 0),
    cfg.critic frozen, AdamW with its moments."""
    import reward

    dtype = DTYPES[cfg.mixed_precision]
    components = _build_on_meta(cfg.model, dtype, blocks)
    components.set_image_size(cfg.target_px)
    bench = MetaBench(components, [], None, None, ["a photo of an astronaut riding a horse on mars"])
    if precompute_wanted(components, None):
        bench.text_encoders_freed = {name: sum(t.numel() * t.element_size() for t in m.parameters())
                                     for name, m in components.text_encoders().items()}
        with bench.values, CudaAutocastOnMeta():
            precompute_text_embeddings(components, bench.prompts)
    bench.params = add_lora(components, LoraConfig(rank=4, alpha=4))
    components.denoiser.train()
    # built on the CPU (open_clip moves what it builds there), then its tensors' data dropped
    bench.critic = reward.load(cfg.critic, device="meta").requires_grad_(False).eval()
    bench.critic.clip.to(dtype)
    bench.optimizer = torch.optim.AdamW(bench.params, lr=1e-9)
    for p in bench.params:  # AdamW makes its moments at its first step: before anything is counted
        p.grad = torch.zeros_like(p)
    with bench.values:
        bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)
    return bench


def _measure(bench: MetaBench, step: StepConfig, batch: int) -> dict[str, float | dict[str, float]]:
    """One update of `bench` at `batch` on the meta device: the largest live bytes in each phase (and module
    rerunning there), its FLOPs, and the denoiser's forward FLOPs with and without gradient."""
    bench.prompts = bench.prompts[:1] * batch
    r = count(lambda timer: update(bench, step, 0, timer), bench.watched(), torch.device("meta"),
              timeline=True, modes=(bench.values, CudaAutocastOnMeta()))
    phases: dict[str, float] = {}
    for place, live in zip(r["places"], r["timeline"]):
        phases[place] = max(phases.get(place, 0.0), float(live))
    denoiser = r["forward_flops"]["unet"]
    return {"phases": phases, "flops": float(r["flops"]), "no_grad": float(denoiser["no_grad"]),
            "grad": float(denoiser["grad"])}


def _combine(terms: list[tuple[float, dict]]) -> dict:
    """The sum of weight x measurement over `terms`, key by key (phases: their union, 0 where absent)."""
    out = {"phases": {}}
    for weight, m in terms:
        for k, v in m.items():
            if k == "phases":
                for place, live in v.items():
                    out["phases"][place] = out["phases"].get(place, 0.0) + weight * live
            else:
                out[k] = out.get(k, 0.0) + weight * v
    return out


def meta_memory_model(cfg: MemoryModelConfig, steps: dict[str, tuple[StepConfig, StepConfig]]) -> dict:
    """The memory model counted on the meta device at cfg.target_px (no fit in the resolution): the bytes of
    the tensors alive after every op of the update and its FLOPs, exactly, as CUDA would store them
    (benchmarks.meta_device); every batch size counted, or, with cfg.extrapolate_depth, a flow transformer
    counted at 2 and 3 blocks of each kind and batch 1 and 2 and extrapolated linearly to its depth and the
    batch sizes, phase by phase (an update's peak is the largest of its phases'). Static bytes: the frozen
    weights, LoRA, AdamW's moments and the critic; the text encoders where training keeps them (UNet
    families), their size listed apart where it frees them."""
    bench = meta_setup(cfg)
    c = bench.components
    static = static_bytes(bench)
    fixed = sum(static.values())
    kinds = transformer_blocks(dict(c.transformer.config)) if cfg.extrapolate_depth and c.is_flow else {}
    if cfg.extrapolate_depth and not kinds:
        raise ValueError("extrapolate_depth needs a flow model (its transformer repeats its blocks)")
    out = {"config": asdict(cfg), "family": c.family,
           "measured_on": {**describe_device(torch.device("cpu")), "counted_on": "meta",
                           "note": "computed on this CPU by running the update on PyTorch's meta device "
                                   "(shapes, no data), CUDA's autocast and attention kernels emulated; a "
                                   "model, not a measurement on a GPU"},
           "torch": torch.__version__,
           "parameters_billion": {name: sum(p.numel() for p in m.parameters()) / 1e9
                                  for name, m in c.modules().items()},
           "static_gib": {k: v / 2**30 for k, v in static.items()},
           "text_encoders_freed_gib": {k: v / 2**30 for k, v in bench.text_encoders_freed.items()},
           "methods": {}}
    if kinds:
        base = dict.fromkeys(kinds, BASE_BLOCKS)
        points = [base] + [{**base, k: BASE_BLOCKS + 1} for k in kinds]
        # full = base + sum over kinds of (blocks - BASE_BLOCKS) x (one block more - base)
        weights = ([1.0 - sum(n - BASE_BLOCKS for n in kinds.values())]
                   + [float(n - BASE_BLOCKS) for n in kinds.values()])
        benches = [meta_setup(cfg, blocks) for blocks in points]
        counted_batches = [1, 2]
        out["depth_extrapolated"] = {"blocks": kinds, "counted_at": points, "counted_batch_sizes": [1, 2]}
    else:
        benches, weights, counted_batches = [bench], [1.0], list(cfg.batch_sizes)

    for method, (full, step) in steps.items():
        _, settings = settings_for(method)
        # what train.gradient_checkpointing: true means for this method on this family
        own = checkpointing_for(method, True, c.family)
        default = next(name for name, setting in settings.items() if setting == own)
        prefix_calls, grad_calls = bench_spec(method).calls(full)
        rows, denoiser_grad = {}, {}
        for name, policy in settings.items():
            measured = {}
            for b in counted_batches:
                runs = []
                for one in benches:
                    one.set_checkpointing(policy)
                    runs.append(_measure(one, step, b))
                measured[b] = _combine(list(zip(weights, runs)))
            # batch B from batch 1 and 2 (every tensor is c + B a) where it was not counted
            at = {bs: measured[bs] if bs in measured else
                  _combine([(2.0 - bs, measured[1]), (bs - 1.0, measured[2])]) for bs in cfg.batch_sizes}
            # the measured update ran one no-grad call; the modelled trajectory runs prefix_calls of them
            flops = {bs: m["flops"] + (prefix_calls - 1) * m["no_grad"] for bs, m in at.items()}
            last = at[cfg.batch_sizes[-1]]["phases"]
            denoiser_grad[name] = at[cfg.batch_sizes[0]]["grad"]
            rows[name] = {
                "checkpointing": asdict(policy),
                "peak_gib": {str(bs): (fixed + max(m["phases"].values())) / 2**30 for bs, m in at.items()},
                "peak_at": max(last, key=last.get),
                "tflop_per_image": flops[cfg.batch_sizes[0]] / cfg.batch_sizes[0] / 1e12,
                "seconds_per_update": {str(bs): f / 1e12 / cfg.sustained_tflops for bs, f in flops.items()},
            }
        for name, row in rows.items():
            row["recompute_ratio_denoiser"] = denoiser_grad[name] / denoiser_grad["none"]
        out["methods"][method] = {"default": default, "prefix_calls": prefix_calls, "grad_calls": grad_calls,
                                  "settings": rows}
    out["unknown_reads_assumed_true"] = sum(b.values.assumed_true for b in benches)
    out["table_markdown"] = model_table_markdown(out)
    return out


# Config keys that may differ between the runs one model file gathers.
PER_RUN_KEYS = ("methods", "extend", "output_file", "device")


def extend_memory_model(earlier: dict, new: dict) -> dict:
    """`earlier`'s methods plus `new`'s (which win), when both modelled the same thing the same way."""
    def same(config):
        return {k: v for k, v in config.items() if k not in PER_RUN_KEYS}

    if earlier.get("torch") != new.get("torch") or same(earlier["config"]) != same(new["config"]):
        raise ValueError("the model to extend was made with other settings; write a new file instead")
    methods = {**earlier["methods"], **new["methods"]}
    order = [*GRAD_METHODS, *sorted(set(methods) - set(GRAD_METHODS))]
    merged = {**new, "methods": {k: methods[k] for k in order if k in methods}}
    merged["config"] = {**new["config"], "methods": list(merged["methods"])}
    merged["measured_on"] = [*([earlier["measured_on"]] if isinstance(earlier["measured_on"], dict)
                               else earlier["measured_on"]), new["measured_on"]]
    merged["table_markdown"] = model_table_markdown(merged)
    return merged


def describe(policy: dict, denoiser: str = "UNet") -> str:
    """What a Checkpointing (as a dict) recomputes in backward, in words."""
    parts = [{"blocks": f"{denoiser} blocks", "calls": f"{denoiser} calls whole"}.get(policy["unet"]),
             "VAE decoder" if policy["vae_decoder"] else None, "critic" if policy["critic"] else None]
    return ", ".join(p for p in parts if p) or "nothing (`gradient_checkpointing: false`)"


def model_table_markdown(model: dict) -> str:
    """The memory model as a README table: one row per method and setting, the method's default in bold."""
    batches = model["config"]["batch_sizes"]
    head = ("| method | recomputed in backward | "
            + " | ".join(f"peak GiB, batch {b}" for b in batches) + " | "
            + " | ".join(f"s/update, batch {b}" for b in batches) + " |")
    lines = [head, "|" + "---|" * (2 + 2 * len(batches))]
    for method, entry in model["methods"].items():
        for name, row in entry["settings"].items():
            what = describe(row["checkpointing"],
                            "transformer" if model.get("family") in FLOW_FAMILIES else "UNet")
            label = f"**{what}** (`true`)" if name == entry["default"] else what
            lines.append(f"| {method} | {label} | "
                         + " | ".join(f"{row['peak_gib'][str(b)]:.1f}" for b in batches) + " | "
                         + " | ".join(f"{row['seconds_per_update'][str(b)]:.2f}" for b in batches) + " |")
    return "\n".join(lines)


@command
def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(MemoryModelConfig, __doc__, argv, one_cpu_thread=True)
    if cfg.extend and not cfg.output_file:
        raise ValueError("extend=true adds to the model in output_file: set --output-file too")
    result = memory_model(cfg)
    if cfg.extend and Path(cfg.output_file).is_file():
        result = extend_memory_model(json.loads(Path(cfg.output_file).read_text()), result)
    report(result, cfg.output_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
