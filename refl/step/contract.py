"""The gradient-method contract: what a method works with (StepContext), what it returns (MethodResult), what
it declares (GradMethod, with BenchSpec for the benchmark) and the one registry, GRAD_METHODS.

A method is a function `(StepContext, start noise) -> MethodResult`, registered with
`register_grad_method(name, GradMethod(run, checkpointing, knobs, bench))`. It samples without gradient
through `ctx.run_no_grad` and makes every UNet call with gradient through `ctx.grad_eps`, which applies the
checkpointing policy (what `train.gradient_checkpointing` recomputes for it, `checkpointing_for`; each
forward on the gradient path runs at most twice) and records the KL term. `knobs` names the StepConfig
fields it reads beyond SHARED_KNOBS with their checks: `validate_step_config` runs them, `ignored_knobs`
lists the fields set for another method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

from refl.components import FLOW_FAMILIES, Checkpointing, SDComponents
from refl.conditioning import Conditioning
from refl.counting import PhaseTimer
from refl.sampling import SCHEDULERS
from refl.step.blocks import (
    add_noise,
    base_weights,
    grad_call,
    guided_eps,
    model_input,
    phase,
    scheduler_step,
)
from refl.step.config import SHARED_KNOBS, StepConfig


@dataclass
class StepContext:
    """What a gradient method works with: one trajectory's scheduler, prompt embeddings and generator, and
    the only two ways to call the UNet. `run_no_grad` samples steps without gradient; `grad_eps` is the
    one UNet call with gradient. It applies the checkpointing policy and records what the step needs from
    every call with gradient (the count, and the KL term when `cfg.kl_weight > 0`), so no method has to
    remember either. Draws from `generator` are part of the method's numbers: keep their order."""

    components: SDComponents
    cfg: StepConfig
    scheduler: Any  # a diffusers scheduler with its timesteps set (make_scheduler)
    cond: Conditioning  # the prompts' text conditioning, hidden states (B, L, D) (+ SDXL's pooled and sizes)
    uncond: Conditioning | None  # the empty prompt's, when guidance is on
    generator: torch.Generator  # the step's CPU generator: cuts, re-noising, stochastic sampler steps
    timer: PhaseTimer | None  # a benchmark's phase timer; None in training
    # (cond, uncond) of the base text encoders
    base_cond: tuple[Conditioning, Conditioning | None] | None = None
    # () per UNet call with gradient (kl_weight > 0)
    kl_terms: list[torch.Tensor] = field(default_factory=list)
    grad_calls: int = 0  # UNet calls with gradient so far (checkpointed reruns not counted)

    @property
    def timesteps(self) -> torch.Tensor:
        """The trajectory's T sampler timesteps, first (noisiest) to last."""
        return self.scheduler.timesteps

    def _predict(self, latents, t):
        x = model_input(self.scheduler, latents, t)
        # (B, C, h, w)
        return guided_eps(self.components, x, t, self.cond, self.uncond, self.cfg.guidance_scale)

    def step(self, eps, t, latents):
        """One sampler step from `latents` at `t` given the model output of `grad_eps`: `.prev_sample`, and
        `.pred_original_sample` (x0; a flow model's x_t - sigma * v). Differentiable; DDPM draws its noise
        from `generator`."""
        return scheduler_step(self.scheduler, eps, t, latents, self.generator, self.cfg.eta)

    def add_noise(self, x0, noise, t):
        """Clean latents `x0` (B, C, h, w) noised to timestep `t` of the trajectory with `noise`."""
        return add_noise(self.scheduler, x0, noise, t)

    def grad_eps(self, latents, t) -> torch.Tensor:
        """The model output (B, C, h, w) at `latents`, `t` (a UNet's noise or v prediction, a flow model's
        velocity), with gradient to the LoRA weights."""
        eps = grad_call(self.components, self._predict, latents, t)
        self.grad_calls += 1
        self._track_kl(eps, latents, t)
        return eps

    def run_no_grad(self, latents, timesteps):
        """Sample through `timesteps` without gradient; returns the last step's latents (B, C, h, w)."""
        with torch.no_grad(), phase(self.timer, "sampling"):
            for t in timesteps:
                latents = self.step(self._predict(latents, t), t, latents).prev_sample
        return latents

    def draw_cut(self) -> int:
        """A step index drawn uniformly from `cfg.cut_range` (inclusive), on `generator`."""
        lo, hi = self.cfg.cut_range
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())

    def _track_kl(self, eps: torch.Tensor, latents: torch.Tensor, t) -> None:
        """Record ||eps - eps_base||^2 for a call with gradient (eps: (B, C, h, w), with grad; for a flow
        model the velocities', the flow form of the same bound: two Euler steps differ by dt times it)."""
        if self.cfg.kl_weight <= 0:
            return
        with torch.no_grad(), phase(self.timer, "kl"), base_weights(self.components):
            cond, uncond = self.base_cond if self.base_cond is not None else (self.cond, self.uncond)
            x = model_input(self.scheduler, latents.detach(), t)
            # (B, C, h, w)
            eps_base = guided_eps(self.components, x, t, cond, uncond, self.cfg.guidance_scale)
        self.kl_terms.append(F.mse_loss(eps.float(), eps_base.float()))


@dataclass
class MethodResult:
    """What a gradient method returns to `reward_step`, which decodes, scores and builds the loss."""

    # Clean-latent predictions x0 (B, C, h, w) that carry gradient; each is decoded and scored, and the
    # reward loss averages over all of them (DRaFT-LV returns n, the others one).
    predictions: list[torch.Tensor]
    # 0-based index of the trajectory's first step with gradient, in [0, num_inference_steps); logged as
    # `cut`.
    cut: int


@dataclass(frozen=True)
class BenchSpec:
    """What the benchmark (benchmarks/ in a checkout) reads of a method, so that it measures this method's
    own gradient path: it pins the path, runs it after a shortened no-grad prefix for the memory model,
    counts its calls and compares the checkpointing settings named here."""

    # cfg -> cfg with the costliest gradient path cfg allows fixed: cut_range [c, c], c the index of the
    # first step with gradient (a cut drawn from a range: the one with the most calls).
    pin: Callable[[StepConfig], StepConfig]
    # pinned cfg -> (UNet calls without gradient before the gradient path, UNet calls with gradient),
    # counting one per sampler step (guidance batches both halves into one call; KL base calls aside).
    calls: Callable[[StepConfig], tuple[int, int]]
    # name -> a checkpointing to compare with none (its baseline, always measured); one is the method's own.
    settings: Mapping[str, Checkpointing]


@dataclass(frozen=True)
class GradMethod:
    """A registered gradient method: how it runs, what it recomputes and which config keys it reads."""

    # (context, start noise (B, C, h, w)) -> MethodResult; its one UNet call with gradient is ctx.grad_eps.
    run: Callable[[StepContext, torch.Tensor], MethodResult]
    # What train.gradient_checkpointing recomputes, chosen by measurement (benchmarks/README.md).
    checkpointing: Checkpointing
    # The StepConfig fields it reads beyond SHARED_KNOBS, each with the check its value must pass. Others
    # set away from their defaults are reported by ignored_knobs (train.py warns; configs switch methods
    # with one override, so a leftover knob is not an error).
    knobs: Mapping[str, Callable[[StepConfig], None]] = field(default_factory=dict)
    # Its gradient path for the benchmark; None: it trains, and the benchmark refuses it by name.
    bench: BenchSpec | None = None


# Whole UNet calls rather than blocks for every shipped method: modelled for SD 1.5 at 512 px in bf16, batch
# 4, the peak is 13.4 GiB against 14.0 (refl, draft), 15.5 against 16.8 (draft_lv) and 13.4 against 20.2
# (alignprop through 10 steps), for 0.5-4% more FLOPs per update: with blocks the UNet's block outputs stay
# alive through the VAE decoder's recomputation, where the peak is.
WHOLE_CALLS = Checkpointing(unet="calls", vae_decoder=True, critic=True)


def unet_granularities(policy: Checkpointing) -> dict[str, Checkpointing]:
    """`policy` with the UNet recomputed by its blocks and by whole calls: the settings the benchmark compares
    for a method whose policy is one of the two."""
    return {"blocks": replace(policy, unet="blocks"), "calls": replace(policy, unet="calls")}


# The one list of gradient methods: a config's step.method, the tests and the benchmark read it.
GRAD_METHODS: dict[str, GradMethod] = {}


def register_grad_method(name: str, method: GradMethod) -> GradMethod:
    """Add a gradient method under `name` (its `step.method` value); refuses a taken name, a knob that is
    no StepConfig field of its own, or benchmark settings that leave out its own policy."""
    if name in GRAD_METHODS:
        raise ValueError(f"gradient method {name!r} is already registered")
    own = {f.name for f in fields(StepConfig)} - set(SHARED_KNOBS)
    wrong = sorted(set(method.knobs) - own)
    if wrong:
        raise ValueError(f"gradient method {name!r} declares knobs {wrong}, which are not its own StepConfig "
                         f"fields; choose from {sorted(own)} or add a field to StepConfig")
    if method.bench is not None and ("none" in method.bench.settings
                                     or method.checkpointing not in method.bench.settings.values()):
        raise ValueError(f"gradient method {name!r}: BenchSpec.settings must hold its own checkpointing "
                         f"{method.checkpointing} and no setting named 'none' (the benchmark adds that one)")
    GRAD_METHODS[name] = method
    return method


def grad_method(name: str) -> GradMethod:
    """The registered method `name`; a ValueError lists the registered ones."""
    if name not in GRAD_METHODS:
        raise ValueError(f"unknown gradient method {name!r}; choose one of {sorted(GRAD_METHODS)}")
    return GRAD_METHODS[name]


# A transformer (SD 3, FLUX) recomputes by its blocks where a method's policy recomputes a UNet's calls
# whole: at 1024 px one whole call's activations, alive at once while backward reruns it, are most of the
# peak (modelled for SD 3.5 medium in bf16 with CFG, batch 1: refl 22.2 GiB with blocks against 30.7 with
# whole calls; every shipped method and model in docs/flow.md), while each block keeps only its input.
FLOW_CHECKPOINTING_UNIT = "blocks"


def checkpointing_for(method: str, enabled: bool, family: str = "sd") -> Checkpointing:
    """The recomputation `train.gradient_checkpointing: enabled` means for this gradient method on a model of
    this family (refl.components.FAMILIES): the method's policy, its whole denoiser calls recomputed by the
    transformer's blocks on the flow families."""
    if not enabled:
        return Checkpointing()
    policy = grad_method(method).checkpointing
    if family in FLOW_FAMILIES and policy.unet == "calls":
        return replace(policy, unet=FLOW_CHECKPOINTING_UNIT)
    return policy


def validate_step_config(cfg: StepConfig) -> None:
    """Refuse a config the step cannot run: an unknown method or sampler, or a bad value of a knob the
    method reads (knobs it ignores are ignored_knobs' business)."""
    method = grad_method(cfg.method)
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    if not cfg.guidance_scale >= 0:  # also NaN; 0 to 1 mean no guidance, as in the stock pipelines
        raise ValueError(f"step.guidance_scale must be >= 0 (1 or less: no guidance), got "
                         f"{cfg.guidance_scale}")
    for check in method.knobs.values():
        check(cfg)


def ignored_knobs(cfg: StepConfig) -> list[str]:
    """The step.* keys set away from their defaults that cfg.method does not read, one line each."""
    method = grad_method(cfg.method)
    default = StepConfig()
    return [f"step.{f.name}={getattr(cfg, f.name)!r} is ignored by step.method={cfg.method} (it reads "
            f"{', '.join(f'step.{k}' for k in method.knobs) or 'no method-specific key'})"
            for f in fields(StepConfig) if f.name not in SHARED_KNOBS and f.name not in method.knobs
            and getattr(cfg, f.name) != getattr(default, f.name)]
