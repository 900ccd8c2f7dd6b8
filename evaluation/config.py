"""The comparison harness's settings (one dataclass, every field commented): what evaluation/harness.py
runs, what evaluation/stats.py summarises and evaluation/report.py describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from evaluation.arms import BASE, REFL, check_model_name
from refl.components import ModelConfig
from reward.evaluators import model_spec
from runkit.config import check_mixed_precision


@dataclass
class CompareConfig:
    # Keys renamed after a release: old dotted key -> new key (refused with the new name for one release).
    RENAMED: ClassVar[dict[str, str]] = {}
    # The base Stable Diffusion: preset ("toy", "tiny"), diffusers directory, or cached model id.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="toy"))
    # ReFL LoRA directory in diffusers format (refl training writes <output_dir>/lora): the tuned model named
    # refl; "" = none (with no `loras` either, the base arms only).
    lora: str = ""
    # More tuned models, each a LoRA directory in diffusers format sampled on the same seeds as base: name
    # (letters, digits, hyphens) -> directory, e.g. --set loras.dpo=runs/dpo/lora
    # --set loras.kto=runs/kto/lora. Each name's arms are {name}_random and {name}_best_of_{n}; the training
    # compute of each is read from its run folder (the LoRA's parent) when the trainer recorded it.
    loras: dict[str, str] = field(default_factory=dict)
    # Multiplier of the LoRA update when sampling a tuned model (1 = as trained); the same for every one.
    lora_scale: float = 1.0
    # Held-out prompts file: .txt (one per line), or .parquet/.csv with a `prompt_column`.
    prompts_file: str = "configs/prompts_toy_heldout.txt"
    # Column holding the prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # Use only the first this many prompts (0 = all of them).
    max_prompts: int = 0
    # N: base samples per prompt; best-of-n is reported for n = 1, 2, 4, ..., N.
    n_samples: int = 64
    # Tuned samples per prompt, per tuned model (same seeds as base samples 0..M-1); 0 = n_samples.
    n_tuned_samples: int = 0
    # Images per sampler call (per device); results do not depend on it. Each call's images are written to
    # samples/ as soon as they are drawn, so an interrupted run loses at most one call's work.
    batch_size: int = 16
    # Sampler steps per image.
    num_inference_steps: int = 50
    # Classifier-free guidance scale; <= 1 disables CFG (then one UNet call per step instead of two).
    guidance_scale: float = 7.5
    # Sampling scheduler: "ddim" (deterministic with eta 0), "ddpm", "flow_euler" (SD 3 / FLUX; the samplers
    # of refl.sampling.SCHEDULERS) or "model" (the one the model ships).
    scheduler: str = "ddim"
    # DDIM eta (0 = deterministic given the initial noise); ignored by other schedulers.
    eta: float = 0.0
    # Base of the per-sample seeds (sample i of prompt p uses seed + 100003 * p + i).
    seed: int = 0
    # The critic best-of-N selects with: a critic directory or an open_clip name (`name:pretrained`), as
    # validate-reward takes it: bare, or as an evaluator spec `critic:DIR` / `clip:NAME` (`clip:` selects by
    # the CLIP score of an untuned open_clip model).
    critic: str = "toy-clip"
    # Further evaluators as specs (reward.evaluators): "critic:DIR", "clip:ViT-L-14:openai", plug-ins
    # such as the toy world's "oracle:" (entry points or register_evaluator). The selector is always evaluated
    # too.
    evaluators: list[str] = field(default_factory=list)
    # Also report best-of-n on top of each tuned model (needs n_tuned_samples >= 2).
    tuned_best_of: bool = True
    # Run folder: samples/, scores/, results.json, report.html.
    output_dir: str = "runs/compare"
    # "cuda", "cpu", ...; "" = cuda when available.
    device: str = ""
    # "no" (fp32), "fp16" (GPU only) or "bf16": the weights' and activations' dtype while sampling.
    mixed_precision: str = "no"
    # Time best-of-N sampling against a stock StableDiffusionPipeline call (cached in throughput.json).
    benchmark_throughput: bool = True
    # Timed calls of each kind, alternating; the fastest of each counts (shared machines are noisy).
    throughput_repeats: int = 3
    # Bootstrap resamples for the 95% intervals (resampling prompts).
    bootstrap_resamples: int = 2000
    # Prompts shown as image grids in report.html (the first ones; the tables use all prompts).
    n_report_prompts: int = 24
    # Side in pixels of images in the report (small images are upscaled with NEAREST, by a whole factor).
    report_image_px: int = 128
    # Side-by-side grids per model (base and each tuned model, the same seeds) for this many prompts (the
    # first ones).
    n_report_grid_prompts: int = 4
    # Samples per arm in each of those grids.
    n_report_grid_samples: int = 8

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_mixed_precision(self.mixed_precision, "mixed_precision")
        if self.n_tuned_samples < 0 or self.n_tuned_samples > self.n_samples:
            raise ValueError(f"n_tuned_samples must be in [0, n_samples={self.n_samples}], got "
                             f"{self.n_tuned_samples}")
        for name, folder in self.loras.items():
            try:
                check_model_name(name)
            except ValueError as err:
                raise ValueError(f"loras.{name}: {err}") from None
            if name == BASE:
                raise ValueError("loras.base: 'base' is the untuned model's name; name the LoRA for what "
                                 "trained it (e.g. loras.dpo)")
            if name == REFL and self.lora:
                raise ValueError(f"loras.refl and lora both name the refl model ({folder!r}, {self.lora!r}); "
                                 "keep one")
            if not isinstance(folder, str) or not folder:
                raise ValueError(f"loras.{name}: give the LoRA directory, got {folder!r}")

    @property
    def tuned(self) -> dict[str, str]:
        """Every tuned model, name -> LoRA directory: refl (from `lora`) first, then `loras` in order."""
        return ({REFL: self.lora} if self.lora else {}) | dict(self.loras)

    @property
    def models(self) -> list[str]:
        """The sample sets drawn: base, then every tuned model."""
        return [BASE, *self.tuned]

    @property
    def n_tuned(self) -> int:
        """Samples per prompt of each tuned model."""
        return self.n_tuned_samples or self.n_samples

    @property
    def cfg_factor(self) -> int:
        """UNet evaluations per step: 2 with classifier-free guidance (uncond + cond), else 1."""
        return 2 if self.guidance_scale > 1.0 else 1

    @property
    def selector_spec(self) -> str:
        """The selector as an evaluator spec: `critic:DIR` or `clip:NAME` (reward.evaluators.model_spec, the
        one reading of a critic the commands share)."""
        kind, model = model_spec(self.critic)
        return f"{kind}:{model}"

    def evaluator_specs(self) -> list[str]:
        """The selector first, then the other evaluators, without duplicates."""
        return list(dict.fromkeys([self.selector_spec, *self.evaluators]))
