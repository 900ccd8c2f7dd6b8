"""The comparison harness's settings (one dataclass, every field commented): what evaluation/harness.py
runs, what evaluation/stats.py summarises and evaluation/report.py describes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from refl.components import ModelConfig
from runkit.config import check_mixed_precision


@dataclass
class CompareConfig:
    # Keys renamed after a release: old dotted key -> new key (refused with the new name for one release).
    RENAMED: ClassVar[dict[str, str]] = {}
    # The base Stable Diffusion: preset ("toy", "tiny"), diffusers directory, or cached model id.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="toy"))
    # ReFL LoRA directory in diffusers format (refl training writes <output_dir>/lora); "" = base arms only.
    lora: str = ""
    # Multiplier of the LoRA update when sampling the tuned model (1 = as trained).
    lora_scale: float = 1.0
    # Held-out prompts file: .txt (one per line), or .parquet/.csv with a `prompt_column`.
    prompts_file: str = "configs/prompts_toy_heldout.txt"
    # Column holding the prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # Use only the first this many prompts (0 = all of them).
    max_prompts: int = 0
    # N: base samples per prompt; best-of-n is reported for n = 1, 2, 4, ..., N.
    n_samples: int = 64
    # Tuned samples per prompt (same seeds as base samples 0..M-1); 0 = n_samples.
    n_tuned_samples: int = 0
    # Images per sampler call (per device); results do not depend on it.
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
    # The critic best-of-N selects with: a critic directory or an open_clip name (`name:pretrained`).
    critic: str = "toy-clip"
    # Further evaluators as specs (reward.evaluators): "critic:DIR", "clip:ViT-L-14:openai", plug-ins
    # such as the toy world's "oracle:" (entry points or register_evaluator). The selector is always evaluated
    # too.
    evaluators: list[str] = field(default_factory=list)
    # Also report best-of-n on top of the tuned model (needs n_tuned_samples >= 2).
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
    # Side-by-side grids per arm (base and ReFL, the same seeds) for this many prompts (the first ones).
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

    @property
    def n_refl(self) -> int:
        return self.n_tuned_samples or self.n_samples

    @property
    def cfg_factor(self) -> int:
        """UNet evaluations per step: 2 with classifier-free guidance (uncond + cond), else 1."""
        return 2 if self.guidance_scale > 1.0 else 1

    @property
    def selector_spec(self) -> str:
        return f"critic:{self.critic}"

    def evaluator_specs(self) -> list[str]:
        """The selector first, then the other evaluators, without duplicates."""
        return list(dict.fromkeys([self.selector_spec, *self.evaluators]))
