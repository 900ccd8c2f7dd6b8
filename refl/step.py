"""One reward-gradient step on Stable Diffusion: ReFL and its relatives.

`reward_step(components, prompts, reward_fn, cfg, generator)` samples latents, takes the gradient
through the part of the chain that `cfg.method` names, decodes with gradient, scores with
`reward_fn(images01 (B, 3, H, W), prompts) -> (B,)` and returns named loss terms; the caller
runs backward and the optimizer (train.py), so gradient accumulation and mixed precision stay there.

Methods (`GRAD_METHODS`):
- `refl` (ImageReward's ReFL): T sampler steps, cut ~ U[cut_range] (inclusive); steps [:cut] without
  gradient, one UNet call with gradient at timesteps[cut], x0 = that step's `pred_original_sample`
  (the remaining steps are not run), decode, reward.
- `draft` (DRaFT-K): sample to the end, gradient through the last K steps only.
- `draft_lv` (DRaFT-LV): sample to the end without gradient, then n times re-noise the sample to the
  last timestep and denoise it with gradient; the loss averages the n predictions (lower variance).
- `alignprop` (AlignProp-style truncation): cut ~ U[cut_range] once per trajectory, gradient through
  every step from the cut to the end.
Each method names what `train.gradient_checkpointing` recomputes for it (`GradMethod.checkpointing`,
applied with `checkpointing_for`): each forward on the gradient path runs at most twice.
Loss: relu(margin - reward).mean() * grad_scale, plus two optional regularisers:
- `reg_weight` x the pre-training denoising MSE on a batch of clean latents (ImageReward's paper);
- `kl_weight` x the mean squared difference between the tuned and the base model's noise
  predictions at every step that has gradient. For two Gaussian sampler steps with the same variance
  the KL divergence is proportional to the squared difference of their means, i.e. of the noise
  predictions, so this bounds how far each step with gradient moves from the base model (DPOK's KL
  term, evaluated on the states the method visits). One extra UNet call per step, without gradient.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refl.components import Checkpointing, SDComponents
from refl.sampling import SCHEDULERS, make_scheduler

logger = logging.getLogger(__name__)

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step is NaN or inf; raised before backward, so no optimizer update happens."""


@dataclass
class StepConfig:
    # Gradient method, a key of GRAD_METHODS: "refl", "draft", "draft_lv", "alignprop".
    method: str = "refl"
    # Sampler used during training, a key of SCHEDULERS: "ddim" (deterministic at eta 0) or "ddpm"
    # (stochastic; what ImageReward's ReFL.py runs).
    scheduler: str = "ddim"
    # Sampler steps T of each training trajectory.
    num_inference_steps: int = 40
    # Inclusive range of 0-based step indices the cut is drawn from (refl: the one step with gradient;
    # alignprop: the first step with gradient). ImageReward: randint(30, 39) of 40.
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
    """Run the base model: LoRA adapters of the UNet and (where attached) the text encoder are off inside."""
    adapted = [m for m in (components.unet, components.text_encoder) if getattr(m, "peft_config", None)]
    for module in adapted:
        module.disable_adapters()
    try:
        yield
    finally:
        for module in adapted:
            module.enable_adapters()


def encode_prompts(components: SDComponents, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> text-encoder hidden states (B, L, D); differentiable if the encoder has trainable LoRA."""
    tok = components.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # (B, L)
    ids = ids.to(components.text_encoder.device)
    return components.text_encoder(ids)[0]  # (B, L, D)


def _eps(components: SDComponents, latents, t, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """The UNet's noise prediction, with classifier-free guidance when guidance_scale > 1."""
    unet = components.unet
    if guidance_scale > 1.0:
        x = torch.cat([latents, latents])  # (2B, C, h, w): unconditional half first
        out = unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample  # (2B, C, h, w)
        e_uncond, e_cond = out.chunk(2)
        return e_uncond + guidance_scale * (e_cond - e_uncond)  # (B, C, h, w)
    return unet(latents, t, encoder_hidden_states=cond).sample  # (B, C, h, w)


def grad_call(components: SDComponents, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """`fn(*args)`, a UNet call with gradient. Under the "calls" policy only its inputs are kept and the
    whole call runs again in backward (its blocks are then not checkpointed, so it runs twice at most)."""
    if components.checkpointing.unet == "calls":
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def initial_latents(components: SDComponents, batch: int, scheduler, generator: torch.Generator) -> torch.Tensor:
    """Start noise drawn on the CPU generator (same numbers on every device), then moved."""
    size = components.unet.config.sample_size
    shape = (batch, components.unet.config.in_channels, size, size)  # (B, C, h, w)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(components.unet.device) * scheduler.init_noise_sigma


def decode(components: SDComponents, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], differentiable (clamp as ReFL does)."""
    vae = components.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample  # (B, 3, H, W) in ~[-1, 1]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_images(components: SDComponents, images01: torch.Tensor, generator=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w) for the denoising regulariser."""
    vae = components.vae
    with torch.no_grad(), components.autocast():
        dist = vae.encode((images01 * 2 - 1).to(vae.device, vae.dtype)).latent_dist
        return dist.sample(generator).float() * vae.config.scaling_factor  # (B, C, h, w)


def denoising_loss(components: SDComponents, latents0: torch.Tensor, captions: Sequence[str],
                   generator: torch.Generator) -> torch.Tensor:
    """The pre-training loss on clean latents: MSE between the UNet output and the noise (or v) target."""
    sched = components.scheduler
    b = latents0.shape[0]
    noise = torch.randn(latents0.shape, generator=generator).to(latents0.device)  # (B, C, h, w)
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(latents0.device)  # (B,)
    noisy = sched.add_noise(latents0, noise, t)  # (B, C, h, w)
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents0, noise, t)
    else:
        target = noise
    cond = encode_prompts(components, captions)  # (B, L, D); the text encoder is not checkpointed

    def unet(x, t, cond):
        return components.unet(x, t, encoder_hidden_states=cond).sample

    pred = grad_call(components, unet, noisy, t, cond)  # (B, C, h, w), its one call with gradient
    return F.mse_loss(pred.float(), target.float())


# ----------------------------------------------------------------------------- gradient methods
@dataclass
class _Ctx:
    components: SDComponents
    cfg: StepConfig
    scheduler: object
    cond: torch.Tensor  # (B, L, D)
    uncond: torch.Tensor | None  # (B, L, D) when guidance is on
    generator: torch.Generator
    timer: PhaseTimer | None
    base_cond: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (cond, uncond) of the base text encoder
    kl_terms: list[torch.Tensor] = field(default_factory=list)  # one () tensor per step with gradient

    def eps(self, latents, t):
        x = self.scheduler.scale_model_input(latents, t)
        return _eps(self.components, x, t, self.cond, self.uncond, self.cfg.guidance_scale)

    def step(self, eps, t, latents):
        return _scheduler_step(self.scheduler, eps, t, latents, self.generator, self.cfg.eta)

    def grad_eps(self, latents, t):
        """eps of a UNet call with gradient, checkpointed as the policy says (grad_call)."""
        return grad_call(self.components, self.eps, latents, t)

    def run_no_grad(self, latents, timesteps):
        with torch.no_grad(), _phase(self.timer, "sampling"):
            for t in timesteps:
                latents = self.step(self.eps(latents, t), t, latents).prev_sample
        return latents

    def track_kl(self, eps: torch.Tensor, latents: torch.Tensor, t) -> None:
        """Record ||eps - eps_base||^2 for a step with gradient (eps: (B, C, h, w), with grad)."""
        if self.cfg.kl_weight <= 0:
            return
        with torch.no_grad(), _phase(self.timer, "kl"), base_weights(self.components):
            cond, uncond = self.base_cond if self.base_cond is not None else (self.cond, self.uncond)
            x = self.scheduler.scale_model_input(latents.detach(), t)
            eps_base = _eps(self.components, x, t, cond, uncond, self.cfg.guidance_scale)  # (B, C, h, w)
        self.kl_terms.append(F.mse_loss(eps.float(), eps_base.float()))

    def draw_cut(self) -> int:
        lo, hi = self.cfg.cut_range
        return int(torch.randint(lo, hi + 1, (1,), generator=self.generator).item())


def _refl(ctx: _Ctx, latents):
    timesteps = ctx.scheduler.timesteps
    cut = ctx.draw_cut()
    latents = ctx.run_no_grad(latents, timesteps[:cut])
    t = timesteps[cut]
    with _phase(ctx.timer, "grad_step"):
        eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
        x0 = ctx.step(eps, t, latents).pred_original_sample  # (B, C, h, w), one-step x0
    ctx.track_kl(eps, latents, t)
    return [x0], {"cut": cut}


def _draft_k(ctx: _Ctx, latents):
    timesteps = ctx.scheduler.timesteps
    k = ctx.cfg.draft_k
    latents = ctx.run_no_grad(latents, timesteps[: len(timesteps) - k])
    with _phase(ctx.timer, "grad_step"):
        for t in timesteps[len(timesteps) - k :]:
            eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
            ctx.track_kl(eps, latents, t)
            latents = ctx.step(eps, t, latents).prev_sample  # grad flows through the K steps
    return [latents], {"cut": len(timesteps) - k}


def _draft_lv(ctx: _Ctx, latents):
    timesteps = ctx.scheduler.timesteps
    x0 = ctx.run_no_grad(latents, timesteps)  # (B, C, h, w), the finished sample
    t = timesteps[-1]
    outs = []
    with _phase(ctx.timer, "grad_step"):
        for _ in range(ctx.cfg.draft_lv_n):
            noise = torch.randn(x0.shape, generator=ctx.generator).to(x0.device)  # (B, C, h, w)
            xt = ctx.scheduler.add_noise(x0, noise, t.reshape(1))  # re-noise to the last timestep
            eps = ctx.grad_eps(xt, t)  # (B, C, h, w)
            ctx.track_kl(eps, xt, t)
            outs.append(ctx.step(eps, t, xt).pred_original_sample)
    return outs, {"cut": len(timesteps) - 1}


def _alignprop(ctx: _Ctx, latents):
    timesteps = ctx.scheduler.timesteps
    cut = ctx.draw_cut()
    latents = ctx.run_no_grad(latents, timesteps[:cut])
    with _phase(ctx.timer, "grad_step"):
        for t in timesteps[cut:]:
            eps = ctx.grad_eps(latents, t)  # (B, C, h, w)
            ctx.track_kl(eps, latents, t)
            latents = ctx.step(eps, t, latents).prev_sample
    return [latents], {"cut": cut}


@dataclass(frozen=True)
class GradMethod:
    run: Callable[[_Ctx, torch.Tensor], tuple[list[torch.Tensor], dict]]  # (ctx, start noise) -> x0s, info
    # What train.gradient_checkpointing recomputes, chosen by measurement (benchmarks/README.md).
    checkpointing: Checkpointing


# Whole UNet calls rather than blocks for every method: modelled for SD 1.5 at 512 px in bf16, batch 4,
# the peak is 14.8 GiB against 15.4 (refl, draft), 16.9 against 18.2 (draft_lv) and 14.8 against 21.6
# (alignprop through 10 steps), for 0.5-4% more FLOPs per update: with blocks the UNet's block outputs stay
# alive through the VAE decoder's recomputation, where the peak is.
_CALLS = Checkpointing(unet="calls", vae_decoder=True, critic=True)
GRAD_METHODS: dict[str, GradMethod] = {
    "refl": GradMethod(_refl, _CALLS),
    "draft": GradMethod(_draft_k, _CALLS),
    "draft_lv": GradMethod(_draft_lv, _CALLS),
    "alignprop": GradMethod(_alignprop, _CALLS),
}


def checkpointing_for(method: str, enabled: bool) -> Checkpointing:
    """The recomputation `train.gradient_checkpointing: enabled` means for this gradient method."""
    if method not in GRAD_METHODS:
        raise ValueError(f"unknown gradient method {method!r}; choose one of {sorted(GRAD_METHODS)}")
    return GRAD_METHODS[method].checkpointing if enabled else Checkpointing()


def validate_step_config(cfg: StepConfig) -> None:
    if cfg.method not in GRAD_METHODS:
        raise ValueError(f"unknown gradient method {cfg.method!r}; choose one of {sorted(GRAD_METHODS)}")
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {cfg.scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    T = cfg.num_inference_steps
    if len(cfg.cut_range) != 2 or not 0 <= cfg.cut_range[0] <= cfg.cut_range[1] < T:
        raise ValueError(f"cut_range {cfg.cut_range} must be [lo, hi] with 0 <= lo <= hi < num_inference_steps={T}")
    if not 1 <= cfg.draft_k <= T:
        raise ValueError(f"draft_k={cfg.draft_k} must be in [1, num_inference_steps={T}]")
    if cfg.draft_lv_n < 1:
        raise ValueError(f"draft_lv_n={cfg.draft_lv_n} must be >= 1")


# ----------------------------------------------------------------------------- the step
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
        cond = encode_prompts(components, prompts)  # (B, L, D)
        uncond = encode_prompts(components, [""] * len(prompts)) if cfg.guidance_scale > 1 else None
    base_cond = None
    if cfg.kl_weight > 0 and getattr(components.text_encoder, "peft_config", None):
        with torch.no_grad(), base_weights(components):  # the base model reads the base text encoder
            base_cond = (encode_prompts(components, prompts),
                         encode_prompts(components, [""] * len(prompts)) if uncond is not None else None)
    ctx = _Ctx(components, cfg, scheduler, cond, uncond, generator, timer, base_cond)
    latents = initial_latents(components, len(prompts), scheduler, generator)  # (B, C, h, w)
    predictions, info = GRAD_METHODS[cfg.method].run(ctx, latents)

    rewards = []
    reward_terms: dict[str, list[torch.Tensor]] = {}
    for x0 in predictions:
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
           if reward.numel() > 1 else torch.zeros(()), "cut": torch.tensor(float(info["cut"]))}
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
            "made. Check the reward (does the critic give NaN?), lower train.lr, or use bf16 instead of fp16.")
    return out
