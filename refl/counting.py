"""Measuring a reward step: wall-clock seconds per phase, and counts that do not depend on the machine or its
load: FLOPs by torch's formulas, the forwards each module runs with gradients on (a forward that
checkpointing reruns in backward counts again), and the bytes of tensors alive at once.

`reward_step(..., timer=PhaseTimer(device))` tags its phases; `count(run, modules, device)` counts one
`run(timer)` (an update: the step, backward, the optimizer); `recompute_ratios(counted, plain)` is what
checkpointing reruns, against the same update without it. The tests check the checkpointing policies with
them and benchmarks/ builds its figures on them.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

# torch's formulas, plus the CPU flash-attention kernels they lack (same arguments as the CUDA ones).
FLOP_FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[aten._scaled_dot_product_flash_attention],
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[aten._scaled_dot_product_flash_attention_backward],
}
ATTENTION_FORWARD = {aten._scaled_dot_product_flash_attention_for_cpu,
                     aten._scaled_dot_product_flash_attention,
                     aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
                     aten._flash_attention_forward, aten._efficient_attention_forward}


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (CUDA synchronised); reward_step tags its phases."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.current: str | None = None  # the phase running now (count's timeline tags memory with it)

    @contextmanager
    def __call__(self, name: str):
        self._sync()
        start, outer, self.current = time.perf_counter(), self.current, name
        try:
            yield
        finally:
            self.current = outer
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class FlopCount(TorchDispatchMode):
    """FLOPs of every op torch has a formula for (`total`), and per watched module (its submodules included)
    those of its forward ops, by whether the forward ran with gradients on (`forward[name]["grad"]`,
    `["no_grad"]`; `["self_attention"]` is the part of both in attention whose queries and keys are equally
    long). A forward that checkpointing reruns in backward runs with gradients on and counts again, and so
    does each submodule's in `grad_forwards` ("unet.down_blocks.0.resnets.0": forwards run with gradients)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        super().__init__()
        self.modules = modules
        self.total = 0
        self.forward = {name: {"grad": 0, "no_grad": 0, "self_attention": 0} for name in modules}
        self.grad_forwards: dict[str, int] = {}
        self._stack: list[tuple[str, bool]] = []
        self._hooks: list = []

    def __enter__(self):
        for name, module in self.modules.items():
            for qualname, m in module.named_modules():
                label = f"{name}.{qualname}" if qualname else name
                self._hooks.append(m.register_forward_pre_hook(partial(self._enter_module, name, label)))
                # always_call: a checkpoint's recomputation stops early by raising once it has what it needs
                self._hooks.append(m.register_forward_hook(self._exit_module, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return super().__exit__(*exc)

    @property
    def running(self) -> str | None:
        """The watched module whose forward runs now, if any."""
        return self._stack[-1][0] if self._stack else None

    def _enter_module(self, name, label, module, args):
        grad = torch.is_grad_enabled()
        self._stack.append((name, grad))
        if grad:
            self.grad_forwards[label] = self.grad_forwards.get(label, 0) + 1

    def _exit_module(self, module, args, output):
        self._stack.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            self.total += flops
            if self._stack:
                name, grad = self._stack[-1]
                entry = self.forward[name]
                entry["grad" if grad else "no_grad"] += flops
                if func.overloadpacket in ATTENTION_FORWARD and args[0].shape[-2] == args[1].shape[-2]:
                    entry["self_attention"] += flops
        return out


def _tensors(out) -> Iterator[torch.Tensor]:
    """The tensors an op returned: one, or a (nested) tuple or list of them."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storage created inside the context and still alive, after every op (`timeline`,
    with the ops in `ops`) and at most (`peak`). Storages are counted once however many views share them and
    leave the count when freed, so this is what a device allocator holds for them, without its rounding and
    cache. An output that shares an input's storage (a view, an in-place op) allocates nothing: a view of a
    tensor made before the context (a weight's transpose in every linear layer) is not counted either."""

    def __init__(self, timeline: bool = False, where: Callable[[], str] | None = None):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.timeline: list[int] | None = [] if timeline else None
        self.ops: list = []
        self.where, self.places = where, []  # with `where`, the place of each timeline entry
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in _tensors((*args, *(kwargs or {}).values()))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = id(storage)
            if key not in self._seen and key not in inputs:
                self._seen.add(key)
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        if self.timeline is not None:
            self.timeline.append(self.live)
            self.ops.append(func)
            if self.where is not None:
                self.places.append(self.where())
        return out


def count(run: Callable[[PhaseTimer], object], modules: dict[str, torch.nn.Module], device: torch.device,
          timeline: bool = False, modes: Sequence = ()) -> dict:
    """FLOPs and tensor memory of `run(timer)`: "flops" (all), "forward_flops" and "grad_forwards" per
    watched module (FlopCount), "peak_tensor_bytes" beyond what existed before (TensorMemory); with
    `timeline`, the live bytes after every op, the ops and the phase (and watched module) of each.
    `modes`: further torch modes entered before the counting ones (a dispatch mode among them sees each op
    after the counters)."""
    flops = FlopCount(modules)
    timer = PhaseTimer(device)

    # the phase, and inside it the watched module running a forward (a rerun, in backward)
    def where() -> str:
        return (timer.current or "") + (f"/{flops.running}" if flops.running else "")

    memory = TensorMemory(timeline, where if timeline else None)
    with contextlib.ExitStack() as stack:
        for mode in (*modes, flops, memory):
            stack.enter_context(mode)
        run(timer)
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
