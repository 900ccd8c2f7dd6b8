"""One reward-gradient step on Stable Diffusion: ReFL and its relatives.

`reward_step(components, prompts, reward_fn, cfg, generator)` samples latents, takes the gradient
through the part of the chain that `cfg.method` names, decodes with gradient, scores with
`reward_fn(images01 (B, 3, H, W), prompts) -> (B,)` and returns named loss terms; the caller
runs backward and the optimizer (train.py), so gradient accumulation and mixed precision stay there.

Methods (`GRAD_METHODS`, the one list; each function's docstring says what it does):
- `refl` (ImageReward's ReFL): T sampler steps, cut ~ U[cut_range] (inclusive); steps [:cut] without
  gradient, one UNet call with gradient at timesteps[cut], x0 = that step's `pred_original_sample`
  (the remaining steps are not run), decode, reward.
- `draft` (DRaFT-K): sample to the end, gradient through the last K steps only.
- `draft_lv` (DRaFT-LV): sample to the end without gradient, then n times re-noise the sample to the
  last timestep and denoise it with gradient; the loss averages the n predictions (lower variance).
- `alignprop` (AlignProp-style truncation): cut ~ U[cut_range] once per trajectory, gradient through
  every step from the cut to the end.
The contract: a method is a function `(StepContext, start noise) -> MethodResult`, registered with
`register_grad_method(name, GradMethod(run, checkpointing, knobs))`. It samples without gradient through
`ctx.run_no_grad` and makes every UNet call with gradient through `ctx.grad_eps`, which applies the
checkpointing policy (what `train.gradient_checkpointing` recomputes for it, `checkpointing_for`; each
forward on the gradient path runs at most twice) and records the KL term. `knobs` names the StepConfig
fields it reads beyond SHARED_KNOBS with their checks: `validate_step_config` runs them, `ignored_knobs`
lists the fields set for another method. reward_step refuses a result that is not a MethodResult, a
cut outside the trajectory or a method that made no call with gradient.
Loss: relu(margin - reward).mean() * grad_scale, plus two optional regularisers:
- `reg_weight` x the pre-training denoising MSE on a batch of clean latents (ImageReward's paper);
- `kl_weight` x the mean squared difference between the tuned and the base model's noise
  predictions at every step that has gradient. For two Gaussian sampler steps with the same variance
  the KL divergence is proportional to the squared difference of their means, i.e. of the noise
  predictions, so this bounds how far each step with gradient moves from the base model (DPOK's KL
  term, evaluated on the states the method visits). One extra UNet call per step, without gradient.
Every UNet call reads its text through refl.conditioning: for SDXL both encoders' hidden states, the
pooled embedding and the size conditioning (add_time_ids), as the stock StableDiffusionXLPipeline
computes them. v-prediction models (SD 2.x) need nothing of their own: the schedulers' `step` turns the
UNet's v into x0, and the denoising regulariser's target is v for them.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refl import conditioning
from refl.components import Checkpointing, SDComponents
from refl.conditioning import Conditioning
from refl.sampling import SCHEDULERS, make_scheduler

logger = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or inf; raised before backward, so no optimizer update happens."""


@dataclass
class StepConfig:
    # Gradient method, a key of GRAD_METHODS (shipped: "refl", "draft", "draft_lv", "alignprop").
    method: str = "refl"
    # Sampler used during training, a key of SCHEDULERS: "ddim" (deterministic at eta 0) or "ddpm"
    # (stochastic; what ImageReward's ReFL.py runs).
    scheduler: str = "ddim"
    # Sampler steps T of each training trajectory.
    num_inference_steps: int = 40
    # Inclusive range of 0-based step indices the cut is drawn from (refl: the one step with gradient;
    # alignprop: the first step with gradient; the others ignore it). ImageReward: randint(30, 39) of 40.
    cut_range: list[int] = field(default_factory=lambda: [30, 39])
    # DRaFT-K: the number of final steps with gradient.
    draft_k: int = 1
    # DRaFT-LV: how many re-noise/denoise passes of the last step (the paper's n = 2).
    draft_lv_n: int = 2
    # Classifier-free guidance scale during training; <= 1 disables it (ReFL trains without it).
    guidance_scale: float = 1.0
    # DDIM eta (0 = deterministic); ignored by DDPM.
    eta: float = 0.0
    # Hinge margin of the reward loss relu(margin - reward), in reward units (2 for normalised rewards).
    reward_margin: float = 2.0
    # Multiplier of the reward loss (ImageReward: 1e-3).
    grad_scale: float = 1e-3
    # Weight of the pre-training denoising MSE added to the reward loss (0 = off, as in ImageReward's code).
    reg_weight: float = 0.0
    # Weight of the KL-to-base penalty: mean squared (tuned - base) noise prediction at each step with
    # gradient (0 = off). Costs one extra UNet call (no gradient) per such step.
    kl_weight: float = 0.0


# ----------------------------------------------------------------------------- schedulers
def _scheduler_step(scheduler, eps, t, latents, generator, eta):
    kwargs = {"generator": generator, "return_dict": True}
    if "eta" in inspect.signature(scheduler.step).parameters:  # DDIM's knob; DDPM has none
        kwargs["eta"] = eta
    return scheduler.step(eps, t, latents, **kwargs)


# ----------------------------------------------------------------------------- timing
class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (CUDA synchronised) for bench_refl.py."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.current: str | None = None  # the phase running now (bench.py tags memory with it)

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


@contextmanager
def _phase(timer: PhaseTimer | None, name: str):
    if timer is None:
        yield
    else:
        with timer(name):
            yield


# ----------------------------------------------------------------------------- building blocks
@contextmanager
def base_weights(components: SDComponents):
    """Run the base model: LoRA adapters of the UNet and (where attached) the text encoders are off inside."""
    adapted = [m for m in (components.unet,
                           *components.text_encoders().values()) if getattr(m, "peft_config", None)]
    for module in adapted:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in adapted:
            module.enable_adapters()


def _eps(components: SDComponents, latents, t, cond: Conditioning, uncond: Conditioning | None,
         guidance_scale: float) -> torch.Tensor:
    """The UNet's noise prediction, with classifier-free guidance when guidance_scale > 1."""
    unet = components.unet
    if guidance_scale > 1.0:
        x = torch.cat([latents, latents])  # (2B, C, h, w): unconditional half first
        out = unet(x, t, **conditioning.cat(uncond, cond).unet_kwargs()).sample  # (2B, C, h, w)
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + guidance_scale * (e_cond - e_uncond)  # (B, C, h, w)
    return unet(latents, t, **cond.unet_kwargs()).sample  # (B, C, h, w)


def grad_call(components: SDComponents, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fn(*args)`, a UNet call with gradient. Under the "calls" policy only its inputs are kept and the
    whole call runs again in backward (its blocks are then not checkpointed, so it runs twice at most)."""
    if components.checkpointing.unet == "calls":
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def initial_latents(components: SDComponents, batch: int, scheduler,
                    generator: torch.Generator) -> torch.Tensor:
    """Start noise drawn on the CPU generator (same numbers on every device), then moved."""
    size = components.unet.config.sample_size
    shape = (batch, components.unet.config.in_channels, size, size)  # (B, C, h, w)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(components.unet.device) * scheduler.init_noise_sigma


def decode(components: SDComponents, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], differentiable (clamp as ReFL does). A VAE kept
    in fp32 under an fp16 base decodes outside autocast (SDXL's overflows in fp16)."""
    vae = components.vae
    with components.vae_autocast():
        # (B, 3, H, W) in ~[-1, 1]
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_images(components: SDComponents, images01: torch.Tensor, generator=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w) for the denoising regulariser."""
    vae = components.vae
    with torch.no_grad(), components.autocast(), components.vae_autocast():
        dist = vae.encode((images01 * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        return dist.sample(generator).float() * vae.config.scaling_factor  # (B, C, h, w)


def denoising_loss(components: SDComponents, latents0: torch.Tensor, captions: Sequence[str],
                   generator: torch.Generator) -> torch.Tensor:
    """The pre-training loss on clean latents: MSE between the UNet output and the noise (or v) target."""
    sched = components.scheduler
    b = latents0.shape[0]
    noise = torch.randn(latents0.shape, generator=generator).to(latents0.device)  # (B, C, h, w)
    # (B,)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(latents0.device)
    noisy = sched.add_noise(latents0, noise, t)  # (B, C, h, w)
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents0, noise, t)
    else:
        target = noise
    cond = conditioning.encode(components, captions)  # the text encoders are not checkpointed

    def unet(x, t, cond):
        return components.unet(x, t, **cond.unet_kwargs()).sample

    pred = grad_call(components, unet, noisy, t, cond)  # (B, C, h, w), its one call with gradient
    return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------- the gradient-method contract
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
    timer: PhaseTimer | None  # bench_refl.py's phase timer; None in training
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
        x = self.scheduler.scale_model_input(latents, t)
        return _eps(self.components, x, t, self.cond, self.uncond, self.cfg.guidance_scale)  # (B, C, h, w)

    def step(self, eps, t, latents):
        """One sampler step from `latents` at `t` given its noise prediction: `.prev_sample`, and
        `.pred_original_sample` (x0). Differentiable; DDPM draws its noise from `generator`."""
        return _scheduler_step(self.scheduler, eps, t, latents, self.generator, self.cfg.eta)

    def grad_eps(self, latents, t) -> torch.Tensor:
        """The noise prediction (B, C, h, w) at `latents`, `t`, with gradient to the LoRA weights."""
        eps = grad_call(self.components, self._predict, latents, t)
        self.grad_calls += 1
        self._track_kl(eps, latents, t)
        return eps

    def run_no_grad(self, latents, timesteps):
        """Sample through `timesteps` without gradient; returns the last step's latents (B, C, h, w)."""
        with torch.no_grad(), _phase(self.timer, "sampling"):
            for t in timesteps:
                latents = self.step(self._predict(latents, t), t, latents).prev_sample
        return latents

    def draw_cut(self) -> int:
        """A step index drawn uniformly from `cfg.cut_range` (inclusive), on `generator`."""
        lo, hi = self.cfg.cut_range
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())

    def _track_kl(self, eps: torch.Tensor, latents: torch.Tensor, t) -> None:
        """Record ||eps - eps_base||^2 for a call with gradient (eps: (B, C, h, w), with grad)."""
        if self.cfg.kl_weight <= 0:
            return
        with torch.no_grad(), _phase(self.timer, "kl"), base_weights(self.components):
            cond, uncond = self.base_cond if self.base_cond is not None else (self.cond, self.uncond)
            x = self.scheduler.scale_model_input(latents.detach(), t)
            eps_base = _eps(self.components, x, t, cond, uncond, self.cfg.guidance_scale)  # (B, C, h, w)
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


# Knob checks: each raises ValueError naming the key when the value cannot work.
def _check_cut_range(cfg: StepConfig) -> None:
    T = cfg.num_inference_steps
    if len(cfg.cut_range) != 2 or not 0 <= cfg.cut_range[0] <= cfg.cut_range[1] < T:
        raise ValueError(f"cut_range {cfg.cut_range} must be [lo, hi] with 0 <= lo <= hi < "
                         f"num_inference_steps={T}")


def _check_draft_k(cfg: StepConfig) -> None:
    if not 1 <= cfg.draft_k <= cfg.num_inference_steps:
        raise ValueError(f"draft_k={cfg.draft_k} must be in [1, "
                         f"num_inference_steps={cfg.num_inference_steps}]")


def _check_draft_lv_n(cfg: StepConfig) -> None:
    if cfg.draft_lv_n < 1:
        raise ValueError(f"draft_lv_n={cfg.draft_lv_n} must be >= 1")


# StepConfig fields reward_step reads for every method; every other field is some method's knob.
SHARED_KNOBS = ("method", "scheduler", "num_inference_steps", "guidance_scale", "eta", "reward_margin",
                "grad_scale", "reg_weight", "kl_weight")


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


# The one list of gradient methods: a config's step.method, the tests and bench_refl.py read it.
GRAD_METHODS: dict[str, GradMethod] = {}


def register_grad_method(name: str, method: GradMethod) -> GradMethod:
    """Add a gradient method under `name` (its `step.method` value); refuses a taken name or a knob that is
    no StepConfig field of its own."""
    if name in GRAD_METHODS:
        raise ValueError(f"gradient method {name!r} is already registered")
    own = {f.name for f in fields(StepConfig)} - set(SHARED_KNOBS)
    wrong = sorted(set(method.knobs) - own)
    if wrong:
        raise ValueError(f"gradient method {name!r} declares knobs {wrong}, which are not its own StepConfig "
                         f"fields; choose from {sorted(own)} or add a field to StepConfig")
    GRAD_METHODS[name] = method
    return method


# ----------------------------------------------------------------------------- gradient methods
def _refl(ctx: StepContext, latents) -> MethodResult:
    """ImageReward's ReFL: no gradient before the cut, one call with gradient, its one-step x0."""
    timesteps = ctx.timesteps
    cut = ctx.draw_cut()
    latents = ctx.run_no_grad(latents, timesteps[:cut])
    t = timesteps[cut]
    with _phase(ctx.timer, "grad_step"):
        eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
        x0 = ctx.step(eps, t, latents).pred_original_sample  # (B, C, h, w), one-step x0
    return MethodResult([x0], cut)


def _draft_k(ctx: StepContext, latents) -> MethodResult:
    """DRaFT-K: sample to the end, gradient through the last K steps."""
    timesteps = ctx.timesteps
    k = ctx.cfg.draft_k
    latents = ctx.run_no_grad(latents, timesteps[: len(timesteps) - k])
    with _phase(ctx.timer, "grad_step"):
        for t in timesteps[len(timesteps) - k :]:
            eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
            latents = ctx.step(eps, t, latents).prev_sample  # grad flows through the K steps
    return MethodResult([latents], len(timesteps) - k)


def _draft_lv(ctx: StepContext, latents) -> MethodResult:
    """DRaFT-LV: the finished sample re-noised to the last timestep and denoised with gradient, n times."""
    timesteps = ctx.timesteps
    x0 = ctx.run_no_grad(latents, timesteps)  # (B, C, h, w), the finished sample
    t = timesteps[-1]
    outs = []
    with _phase(ctx.timer, "grad_step"):
        for _ in range(ctx.cfg.draft_lv_n):
            noise = torch.randn(x0.shape, generator=ctx.generator).to(x0.device)  # (B, C, h, w)
            xt = ctx.scheduler.add_noise(x0, noise, t.reshape(1))  # re-noise to the last timestep
            eps = ctx.grad_eps(xt, t)  # (B, C, h, w)
            outs.append(ctx.step(eps, t, xt).pred_original_sample)
    return MethodResult(outs, len(timesteps) - 1)


def _alignprop(ctx: StepContext, latents) -> MethodResult:
    """AlignProp-style truncation: gradient through every step from the cut to the end."""
    timesteps = ctx.timesteps
    cut = ctx.draw_cut()
    latents = ctx.run_no_grad(latents, timesteps[:cut])
    with _phase(ctx.timer, "grad_step"):
        for t in timesteps[cut:]:
            eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
            latents = ctx.step(eps, t, latents).prev_sample
    return MethodResult([latents], cut)


# Whole UNet calls rather than blocks for every method: modelled for SD 1.5 at 512 px in bf16, batch 4,
# the peak is 14.8 GiB against 15.4 (refl, draft), 16.9 against 18.2 (draft_lv) and 14.8 against 21.6
# (alignprop through 10 steps), for 0.5-4% more FLOPs per update: with blocks the UNet's block outputs stay
# alive through the VAE decoder's recomputation, where the peak is.
_CALLS = Checkpointing(unet="calls", vae_decoder=True, critic=True)
register_grad_method("refl", GradMethod(_refl, _CALLS, {"cut_range": _check_cut_range}))
register_grad_method("draft", GradMethod(_draft_k, _CALLS, {"draft_k": _check_draft_k}))
register_grad_method("draft_lv", GradMethod(_draft_lv, _CALLS, {"draft_lv_n": _check_draft_lv_n}))
register_grad_method("alignprop", GradMethod(_alignprop, _CALLS, {"cut_range": _check_cut_range}))


def grad_method(name: str) -> GradMethod:
    """The registered method `name`; a ValueError lists the registered ones."""
    if name not in GRAD_METHODS:
        raise ValueError(f"unknown gradient method {name!r}; choose one of {sorted(GRAD_METHODS)}")
    return GRAD_METHODS[name]


def checkpointing_for(method: str, enabled: bool) -> Checkpointing:
    """The recomputation `train.gradient_checkpointing: enabled` means for this gradient method."""
    policy = grad_method(method).checkpointing
    return policy if enabled else Checkpointing()


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


# ----------------------------------------------------------------------------- the step
def _checked(cfg: StepConfig, result, ctx: StepContext) -> MethodResult:
    """The method's result, refused here with the method's name rather than deep in the loss."""
    name = f"gradient method {cfg.method!r}"
    if not isinstance(result, MethodResult):
        raise TypeError(f"{name} returned {type(result).__name__}, not a refl.step.MethodResult")
    if not result.predictions:
        raise ValueError(f"{name} returned no predictions to score")
    if ctx.grad_calls == 0:
        raise ValueError(f"{name} made no UNet call through StepContext.grad_eps, so nothing trains (and "
                         "neither checkpointing nor the KL term would see a call made another way)")
    if not 0 <= result.cut < cfg.num_inference_steps:
        raise ValueError(f"{name} returned cut={result.cut}, outside [0, "
                         f"num_inference_steps={cfg.num_inference_steps})")
    return result


def reward_step(
    components: SDComponents,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    cfg: StepConfig,
    generator: torch.Generator,
    reg_batch: tuple[torch.Tensor, Sequence[str]] | None = None,
    step_name: str = "step",
    timer: PhaseTimer | None = None,
) -> dict[str, torch.Tensor]:
    """One reward-gradient forward pass; returns {"loss" (with grad), "reward_loss", "reward", ...}.

    reg_batch: (clean scaled latents (B', C, h, w), captions) for the denoising regulariser, used
    when cfg.reg_weight > 0. Raises NonFiniteLossError (naming `step_name`) on a NaN/inf loss.
    """
    with components.autocast():
        return _reward_step(components, prompts, reward_fn, cfg, generator, reg_batch, step_name, timer)


def _reward_step(components, prompts, reward_fn, cfg, generator, reg_batch, step_name, timer):
    validate_step_config(cfg)
    scheduler = make_scheduler(cfg.scheduler, components)
    scheduler.set_timesteps(cfg.num_inference_steps, device=components.unet.device)
    with _phase(timer, "text"):
        cond = conditioning.encode(components, prompts)  # hidden states (B, L, D), SDXL's pooled and sizes
        uncond = conditioning.negative(components, cond) if cfg.guidance_scale > 1 else None
    base_cond = None
    if cfg.kl_weight > 0 and any(getattr(m, "peft_config", None)
                                 for m in components.text_encoders().values()):
        with torch.no_grad(), base_weights(components):  # the base model reads the base text encoders
            base = conditioning.encode(components, prompts)
            base_cond = (base, conditioning.negative(components, base) if uncond is not None else None)
    ctx = StepContext(components, cfg, scheduler, cond, uncond, generator, timer, base_cond)
    latents = initial_latents(components, len(prompts), scheduler, generator)  # (B, C, h, w)
    result = _checked(cfg, GRAD_METHODS[cfg.method].run(ctx, latents), ctx)

    rewards = []
    reward_terms: dict[str, list[torch.Tensor]] = {}
    for x0 in result.predictions:
        with _phase(timer, "decode"):
            images = decode(components, x0)  # (B, 3, H, W) in [0, 1]
        with _phase(timer, "critic"):
            r = reward_fn(images, list(prompts))  # (B,)
        if r.shape != (len(prompts),):
            raise ValueError(f"reward_fn returned shape {tuple(r.shape)}, expected ({len(prompts)},)")
        rewards.append(r.float())
        # A weighted mix (refl.mix.WeightedRewards) exposes its unweighted terms, (B,) each, for logging.
        for name, term in (getattr(reward_fn, "last_terms", None) or {}).items():
            reward_terms.setdefault(name, []).append(term.detach().float())
    reward = torch.stack(rewards)  # (n, B): n = 1 except for DRaFT-LV
    reward_loss = F.relu(cfg.reward_margin - reward).mean() * cfg.grad_scale
    out = {"reward_loss": reward_loss, "reward": reward.detach().mean(), "reward_std": reward.detach().std()
           if reward.numel() > 1 else torch.zeros(()), "cut": torch.tensor(float(result.cut))}
    out.update({f"reward/{name}": torch.stack(terms).mean() for name, terms in reward_terms.items()})
    loss = reward_loss
    if cfg.reg_weight > 0:
        if reg_batch is None:
            raise ValueError("reg_weight > 0 but no reg_batch (clean latents, captions) was given")
        reg = denoising_loss(components, reg_batch[0], reg_batch[1], generator)
        out["reg_loss"] = reg.detach()
        loss = loss + cfg.reg_weight * reg
    if cfg.kl_weight > 0:
        kl = torch.stack(ctx.kl_terms).mean()
        out["kl_loss"] = kl.detach()
        loss = loss + cfg.kl_weight * kl
    out["loss"] = loss
    if not torch.isfinite(loss.detach()).all():
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items() if k != "loss" and v.numel() == 1)
        raise NonFiniteLossError(
            f"{step_name}: loss is {loss.item()} ({terms}); stopped before backward, no optimizer update was "
            "made. Check the reward (does the critic give NaN?), lower train.lr, or use bf16 instead of "
            "fp16.")
    return out
