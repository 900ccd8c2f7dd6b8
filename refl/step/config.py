"""The step's config (`refl.step.*` of a training config) and the checks of the knobs methods share."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepConfig:
    # Gradient method, a key of GRAD_METHODS (shipped: "refl", "draft", "draft_lv", "alignprop",
    # "direct_align").
    method: str = "refl"
    # Sampler used during training, a key of SCHEDULERS: "ddim" (deterministic at eta 0) or "ddpm"
    # (stochastic; what ImageReward's ReFL.py runs) for UNet models, "flow_euler" for SD 3 / FLUX.
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


# StepConfig fields reward_step reads for every method; every other field is some method's knob.
SHARED_KNOBS = ("method", "scheduler", "num_inference_steps", "guidance_scale", "eta", "reward_margin",
                "grad_scale", "reg_weight", "kl_weight")


def check_cut_range(cfg: StepConfig) -> None:
    """The knob check of every method that draws a cut (a ValueError naming the key)."""
    T = cfg.num_inference_steps
    if len(cfg.cut_range) != 2 or not 0 <= cfg.cut_range[0] <= cfg.cut_range[1] < T:
        raise ValueError(f"cut_range {cfg.cut_range} must be [lo, hi] with 0 <= lo <= hi < "
                         f"num_inference_steps={T}")
