"""What a LoRA training run spent, recorded by both trainers (refl/train.py, preference/train.py) in every
checkpoint's state and in result.json, and read back by the comparison (evaluation/) to set each tuned
model's training cost beside its sampling cost.

Denoiser evaluations are counted in images, as sampling's cost is (a call on a batch of B counts B, a
classifier-free-guidance pair counts 2):

- `denoiser_forwards`: forwards started in the updates outside backward, with or without gradient (ReFL's
  rollout steps, preference tuning's reference passes, the regulariser's);
- `denoiser_backwards`: images whose denoiser output received a gradient in backward;
- `denoiser_recomputed`: forwards rerun inside backward by checkpointing the whole call (diffusers' own block
  checkpointing reruns parts of the denoiser and is not counted here; refl/counting.py measures that);
- `validation_denoiser_forwards`: the validation sampling's forwards;

update counts summed over processes, validation on the main process; and wall-clock seconds of the updates
(`seconds_training`) and of the validations (`seconds_validating`) on the main process. A run resumed from
a checkpoint carries on from that checkpoint's totals, so work lost to an interruption is not counted.
These hooks cost a few integer additions per call; the FLOP and memory counts of refl/counting.py are
for benchmarks.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch

# The fields of ComputeSpent, in result.json's "compute" and each checkpoint's state.json.
COMPUTE_FIELDS = ("seconds_training", "seconds_validating", "denoiser_forwards", "denoiser_backwards",
                  "denoiser_recomputed", "validation_denoiser_forwards")


@dataclass
class ComputeSpent:
    """A trainer state's compute totals (the trainers' states extend it, so checkpoints carry them)."""

    seconds_training: float = 0.0  # wall-clock seconds of the updates, main process
    seconds_validating: float = 0.0  # wall-clock seconds of the validations, main process
    denoiser_forwards: int = 0  # images through the denoiser's forward in the updates, all processes
    denoiser_backwards: int = 0  # images whose denoiser output got a gradient, all processes
    denoiser_recomputed: int = 0  # forwards rerun inside backward (whole-call checkpointing), all processes
    validation_denoiser_forwards: int = 0  # images through the denoiser while validating, main process


def compute_of(state: ComputeSpent) -> dict:
    """The compute totals of a trainer state, as result.json's "compute"."""
    return {f.name: getattr(state, f.name) for f in fields(ComputeSpent)}


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ComputeMeter:
    """Counts a denoiser's evaluations (hooks on its forward) and times the trainer's phases: `update_done`
    folds what the updates spent since the last fold into a ComputeSpent state (the time between updates,
    a checkpoint's writing, counts as theirs), `validating` what one validation spends."""

    def __init__(self, denoiser: torch.nn.Module):
        self.forwards = self.backwards = self.recomputed = 0
        self._hooks = [denoiser.register_forward_pre_hook(self._before, with_kwargs=True),
                       denoiser.register_forward_hook(self._after)]
        self.started = time.perf_counter()

    @staticmethod
    def _batch(args, kwargs) -> int:
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        return int(x.shape[0]) if isinstance(x, torch.Tensor) else 0

    def _before(self, module, args, kwargs):
        n = self._batch(args, kwargs)
        if _in_backward():
            self.recomputed += n
        else:
            self.forwards += n

    def _after(self, module, args, output):
        out = output if isinstance(output, torch.Tensor) else getattr(output, "sample", None)
        if out is None and isinstance(output, tuple):
            out = output[0]
        if isinstance(out, torch.Tensor) and out.requires_grad and not _in_backward():
            out.register_hook(partial(self._backward, int(out.shape[0])))

    def _backward(self, n: int, grad: torch.Tensor) -> None:
        self.backwards += n

    def restart(self) -> None:
        """Start timing a phase now, dropping what was counted before it (loading, warm-up)."""
        self.forwards = self.backwards = self.recomputed = 0
        self.started = time.perf_counter()

    def update_done(self, state: ComputeSpent, accelerator) -> None:
        """Fold an update (every process calls it: the counts are summed over processes)."""
        counts = torch.tensor([self.forwards, self.backwards, self.recomputed], dtype=torch.int64,
                              device=accelerator.device)  # (3,)
        counts = accelerator.reduce(counts, reduction="sum")
        state.denoiser_forwards += int(counts[0])
        state.denoiser_backwards += int(counts[1])
        state.denoiser_recomputed += int(counts[2])
        state.seconds_training += time.perf_counter() - self.started
        self.restart()

    @contextmanager
    def validating(self, state: ComputeSpent):
        """A validation (main process only): its forwards and seconds go to the validation's totals, not the
        updates'."""
        started, before = time.perf_counter(), self.forwards
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            state.validation_denoiser_forwards += self.forwards - before
            state.seconds_validating += elapsed
            self.forwards = before
            self.started += elapsed

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def training_compute(lora_dir: str | Path) -> dict | None:
    """What the run that saved `lora_dir` spent ("compute" of its run folder's result.json, or of the
    checkpoint's state.json for a checkpoint's lora/), with its "updates"; None when the folder holds no
    record (a LoRA from elsewhere, or trained before runs recorded it)."""
    run = Path(lora_dir).parent
    for name, updates in (("result.json", "updates"), ("state.json", "update")):
        path = run / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        spent = data.get("compute", data)
        if isinstance(spent, dict) and all(k in spent for k in COMPUTE_FIELDS):
            return {k: spent[k] for k in COMPUTE_FIELDS} | {"updates": data.get(updates)}
    return None
