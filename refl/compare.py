"""Best-of-N selection against ReFL fine-tuning, on held-out prompts (design.md sections 6 and 7).

For every prompt the harness draws N base samples with fixed per-sample seeds, scores them with the
selector critic and keeps the best; it draws samples from the tuned model (base + LoRA) with the same
seeds, and optionally best-of-n on top of it. Arms (rows of the report):

- `base_random`        one random base sample (the mean over the N, i.e. its expectation);
- `base_best_of_{n}`   the selector's favourite among the FIRST n base samples, n = 1, 2, 4, ..., N
                       (nested subsets of the same draws: the whole reward-vs-n curve costs nothing extra);
- `refl_random`        one random tuned sample (mean over the tuned samples);
- `refl_best_of_{n}`   best-of-n on the tuned samples (when `tuned_best_of`).

Every arm is scored by every evaluator (the selector is always one of them: selecting on a critic
inflates that critic, exactly as fine-tuning on it does, so the other evaluators are the honest ones).

Output folder: `samples/{base,refl}/PPPP.npz` (uint8 images + seeds, written once, never redrawn),
`scores/{base,refl}/PPPP.json` (per-image scores per evaluator, cached), `throughput.json`,
`results.json` (every number) and `report.html` (see refl/report.py). A rerun reuses everything on
disk, so an interrupted run resumes where it stopped and the numbers of a finished run reproduce.

Seeds: sample i of prompt p uses `seed + SEED_STRIDE * p + i`, each with its own CPU `torch.Generator`,
so sample i is the same whatever the batch size (up to float rounding of batched kernels: at most 1
grey level) and on CPU or GPU, and base and tuned sample i start from the same noise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refl.components import DTYPES, ModelConfig
from refl.evaluators import CriticEvaluator, create_evaluator
from refl.prompts import read_prompt_file
from refl.sampling import sample, seed_generators
from reward.stats import bootstrap_ci
from runkit.config import save_config, to_dict
from runkit.files import atomic_write_bytes, content_hash, finite_json, write_json

logger = logging.getLogger(__name__)

SEED_STRIDE = 100_003  # per-prompt seed offset; larger than any sensible N, so no two samples share a seed
ARMS = ("base", "refl")  # sample sets on disk: the untuned model and base + LoRA


@dataclass
class CompareConfig:
    # The base Stable Diffusion: preset ("toy", "tiny"), diffusers directory, or cached model id.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="toy"))
    # ReFL LoRA directory in diffusers format (refl training writes <output_dir>/lora); "" = base arms only.
    lora: str = ""
    # Multiplier of the LoRA update when sampling the tuned model (1 = as trained).
    lora_scale: float = 1.0
    # Held-out prompts: a .txt file (one per line) or a .parquet/.csv file with a `prompt_column`.
    prompts: str = "configs/prompts_toy_heldout.txt"
    # Column holding the prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # Use only the first this many prompts (0 = all of them).
    max_prompts: int = 0
    # N: base samples per prompt; best-of-n is reported for n = 1, 2, 4, ..., N.
    n_samples: int = 64
    # Tuned samples per prompt (same seeds as base samples 0..M-1); 0 = n_samples.
    refl_samples: int = 0
    # Images per sampler call (per device); results do not depend on it.
    batch_size: int = 16
    # Sampler steps per image.
    num_inference_steps: int = 50
    # Classifier-free guidance scale; <= 1 disables CFG (then one UNet call per step instead of two).
    guidance_scale: float = 7.5
    # Sampling scheduler: "ddim" (deterministic with eta 0) or "ddpm" (see refl.sampling.SCHEDULERS).
    scheduler: str = "ddim"
    # DDIM eta (0 = deterministic given the initial noise); ignored by other schedulers.
    eta: float = 0.0
    # Base of the per-sample seeds (sample i of prompt p uses seed + 100003 * p + i).
    seed: int = 0
    # The critic best-of-N selects with: a critic directory or an open_clip name (`name:pretrained`).
    selector: str = "toy-clip"
    # Further evaluators as specs (refl.evaluators): "critic:DIR", "clip:ViT-L-14:openai", plug-ins
    # such as the toy world's "oracle:" once registered. The selector is always evaluated too.
    evaluators: list[str] = field(default_factory=list)
    # Also report best-of-n on top of the tuned model (needs refl_samples >= 2).
    tuned_best_of: bool = True
    # Run folder: samples/, scores/, results.json, report.html.
    output_dir: str = "runs/compare"
    # "cuda", "cpu", ...; "" = cuda when available.
    device: str = ""
    # Weights and activations while sampling: fp32, fp16 or bf16 (fp16 needs a GPU).
    dtype: str = "fp32"
    # Time best-of-N sampling against a stock StableDiffusionPipeline call (cached in throughput.json).
    benchmark_throughput: bool = True
    # Timed calls of each kind, alternating; the fastest of each counts (shared machines are noisy).
    throughput_repeats: int = 3
    # Bootstrap resamples for the 95% intervals (resampling prompts).
    bootstrap_resamples: int = 2000
    # Prompts shown as image grids in report.html (the first ones; the tables use all prompts).
    report_prompts: int = 24
    # Side in pixels of images in the report (small images are upscaled with NEAREST).
    report_image_px: int = 128

    def __post_init__(self):
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.refl_samples < 0 or self.refl_samples > self.n_samples:
            raise ValueError(f"refl_samples must be in [0, n_samples={self.n_samples}], got {self.refl_samples}")

    @property
    def n_refl(self) -> int:
        return self.refl_samples or self.n_samples

    @property
    def cfg_factor(self) -> int:
        """UNet evaluations per step: 2 with classifier-free guidance (uncond + cond), else 1."""
        return 2 if self.guidance_scale > 1.0 else 1

    @property
    def selector_spec(self) -> str:
        return f"critic:{self.selector}"

    def evaluator_specs(self) -> list[str]:
        """The selector first, then the other evaluators, without duplicates."""
        return list(dict.fromkeys([self.selector_spec, *self.evaluators]))


# ----------------------------------------------------------------------------- inputs and files
def load_prompts(path: str | os.PathLike, column: str = "prompt", limit: int = 0) -> list[str]:
    """Prompts from a .txt file (one per line, blank lines skipped) or a .parquet/.csv `column`."""
    prompts = read_prompt_file(path, column, "prompts file", "prompt_column")
    return prompts[:limit] if limit else prompts


def sample_seeds(cfg: CompareConfig, prompt_index: int, n: int) -> np.ndarray:
    return cfg.seed + SEED_STRIDE * prompt_index + np.arange(n, dtype=np.int64)  # (n,)


def arm_fingerprint(cfg: CompareConfig, arm: str) -> str:
    """Everything that determines an arm's pixels, model and LoRA by the content of their files, so a
    LoRA retrained into the same folder is drawn again; stored beside the samples."""
    keys = {"model": to_dict(cfg.model), "model_content": content_hash(cfg.model.name),
            "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale, "scheduler": cfg.scheduler,
            "eta": cfg.eta, "seed": cfg.seed, "dtype": cfg.dtype}
    if arm == "refl":
        keys.update(lora=content_hash(cfg.lora), lora_scale=cfg.lora_scale)
    return json.dumps(keys, sort_keys=True)


def samples_path(out: Path, arm: str, prompt_index: int) -> Path:
    return out / "samples" / arm / f"{prompt_index:04d}.npz"


def scores_path(out: Path, arm: str, prompt_index: int) -> Path:
    return out / "scores" / arm / f"{prompt_index:04d}.json"


def load_samples(path: Path, fingerprint: str, seeds: np.ndarray) -> dict | None:
    """Stored samples of one prompt and arm; None when absent or drawn from other files or settings."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    n = len(seeds)
    if str(stored["fingerprint"]) != fingerprint:
        logger.info("%s was drawn from other model files or settings; drawing it again", path)
        return None
    if len(stored["seeds"]) < n or not np.array_equal(stored["seeds"][:n], seeds):
        logger.info("%s holds other seeds than this run needs; drawing it again", path)
        return None
    return {"images": stored["images"][:n], "seeds": seeds, "seconds": float(stored["seconds"]) * n / len(stored["seeds"])}


def save_samples(path: Path, images: np.ndarray, seeds: np.ndarray, prompt: str, fingerprint: str,
                 seconds: float) -> None:
    atomic_write_bytes(path, lambda f: np.savez(f, images=images, seeds=seeds, prompt=np.array(prompt),
                                                 fingerprint=np.array(fingerprint), seconds=np.array(seconds)))


# ----------------------------------------------------------------------------- sampling
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    """A stock StableDiffusionPipeline driven for best-of-N: one text encoding per prompt and arm,
    one CPU generator per image, LoRA switched on and off in place (no second copy of the model)."""

    def __init__(self, cfg: CompareConfig, components=None):
        from refl.components import load_components
        from refl.sampling import make_pipeline

        self.cfg = cfg
        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        components = components if components is not None else load_components(cfg.model)
        self.pipe = make_pipeline(components, cfg.scheduler)
        self.pipe.to(self.device, DTYPES[cfg.dtype])
        self.has_lora = bool(cfg.lora)
        if self.has_lora:
            if not Path(cfg.lora).is_dir():
                raise FileNotFoundError(f"lora={cfg.lora} is not a directory (expected a LoRA saved by refl "
                                        "training, e.g. runs/refl_toy/lora); set lora='' for base arms only")
            self.pipe.load_lora_weights(cfg.lora, adapter_name="refl")
        self.arm = None
        self.set_arm("base")
        self.images_drawn = 0  # counts every generated image (tests check resumed runs draw none)

    def set_arm(self, arm: str) -> None:
        if arm not in ARMS:
            raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")
        if arm == self.arm:
            return
        if arm == "refl":
            if not self.has_lora:
                raise RuntimeError("the refl arm needs cfg.lora")
            self.pipe.enable_lora()
            self.pipe.set_adapters(["refl"], adapter_weights=[self.cfg.lora_scale])
        elif self.has_lora:
            self.pipe.disable_lora()
        self.arm = arm

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings of one prompt (1, T, C) and of the empty negative prompt (None without CFG)."""
        do_cfg = self.cfg.guidance_scale > 1.0
        cond, uncond = self.pipe.encode_prompt(prompt, self.pipe.device, 1, do_cfg, negative_prompt="")
        return cond, uncond  # (1, T, C), (1, T, C)

    @torch.no_grad()
    def sample(self, prompt: str, seeds: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Images of `prompt` for these seeds, uint8 (n, H, W, 3), drawn `batch_size` at a time."""
        batch_size = batch_size or self.cfg.batch_size
        cond, uncond = self.encode(prompt)  # once per prompt, repeated per batch
        images = sample(self.pipe, prompt_embeds=cond, negative_prompt_embeds=uncond, seeds=seeds,
                        num_inference_steps=self.cfg.num_inference_steps, guidance_scale=self.cfg.guidance_scale,
                        eta=self.cfg.eta, batch_size=batch_size)  # (n, H, W, 3) uint8
        self.images_drawn += len(seeds)
        return images

    def timed_sample(self, prompt: str, seeds: np.ndarray) -> tuple[np.ndarray, float]:
        _sync(self.device)
        t0 = time.perf_counter()
        images = self.sample(prompt, seeds)
        _sync(self.device)
        return images, time.perf_counter() - t0

    @torch.no_grad()
    def stock_call(self, prompt: str, seeds: np.ndarray) -> float:
        """Seconds for the stock way to draw the same batch: `pipe(prompt=[p] * B, ...)`."""
        gens = seed_generators(seeds)
        _sync(self.device)
        t0 = time.perf_counter()
        self.pipe(prompt=[prompt] * len(seeds), num_inference_steps=self.cfg.num_inference_steps,
                  guidance_scale=self.cfg.guidance_scale, eta=self.cfg.eta, generator=gens, output_type="np")
        _sync(self.device)
        return time.perf_counter() - t0


def measure_throughput(sampler: Sampler, prompt: str, repeats: int = 1) -> dict:
    """Images/s of our best-of-N batch against a stock `pipe(prompt=[p] * B, ...)` call on the same batch
    and prompt (base model): one warm-up of each, then `repeats` alternating timed calls, fastest of each."""
    cfg = sampler.cfg
    sampler.set_arm("base")
    seeds = np.arange(cfg.batch_size, dtype=np.int64)
    drawn = sampler.images_drawn
    sampler.sample(prompt, seeds[:1])  # warm-up: kernels, allocator
    sampler.stock_call(prompt, seeds[:1])
    ours_all, stock_all = [], []
    for _ in range(max(1, repeats)):
        ours_all.append(sampler.timed_sample(prompt, seeds)[1])
        stock_all.append(sampler.stock_call(prompt, seeds))
    sampler.images_drawn = drawn  # benchmark images are not samples
    ours, stock = min(ours_all), min(stock_all)
    result = {"batch_size": cfg.batch_size, "steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
              "device": str(sampler.device), "dtype": cfg.dtype, "repeats": len(ours_all),
              "ours_seconds_all": ours_all, "stock_seconds_all": stock_all, "ours_seconds": ours, "stock_seconds": stock,
              "ours_images_per_s": cfg.batch_size / ours, "stock_images_per_s": cfg.batch_size / stock,
              "ratio_vs_stock": stock / ours}
    logger.info("throughput: %.2f images/s (stock StableDiffusionPipeline %.2f images/s): ratio %.3f",
                result["ours_images_per_s"], result["stock_images_per_s"], result["ratio_vs_stock"])
    return result


# ----------------------------------------------------------------------------- statistics
def best_of_n_indices(selector_scores: np.ndarray, n: int) -> np.ndarray:
    """(P, N) selector scores -> (P,) index of the best among the FIRST n samples (first one on ties)."""
    if not 1 <= n <= selector_scores.shape[1]:
        raise ValueError(f"n must be in [1, {selector_scores.shape[1]}], got {n}")
    return np.argmax(selector_scores[:, :n], axis=1)


def n_grid(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, with n_max itself appended when it is not a power of two."""
    grid = [2**k for k in range(int(math.log2(n_max)) + 1)]
    return grid if grid[-1] == n_max else [*grid, n_max]


def mean_ci(values, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Mean over prompts and its 95% percentile-bootstrap interval (resampling prompts)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
    return {"mean": float(values.mean()), "ci95": [lo, hi], "n": int(values.size)}


def win_shares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt, the share of comparisons a wins (ties count half). a, b: (P,) or (P, k), broadcast."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    outcome = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
    return outcome.reshape(outcome.shape[0], -1).mean(axis=1)  # (P,)


def pairwise_diversity(embeddings: torch.Tensor) -> float:
    """Mean over pairs i != j of 1 - cos(e_i, e_j) for normalised embeddings (n, D)."""
    n = embeddings.shape[0]
    if n < 2:
        return float("nan")
    e = embeddings.double()
    sim = e @ e.T  # (n, n)
    return float((1.0 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item())


def compute_statistics(cfg: CompareConfig, prompts: list[str], scores: dict[str, dict[str, np.ndarray]],
                       diversity: dict[str, np.ndarray], seconds: dict[str, float]) -> dict:
    """Every number of results.json from per-image scores.

    scores[arm][spec]: (P, n_arm) per-image scores; diversity[arm]: (P,); seconds: per-image sampling
    seconds per arm and selector seconds per image ("selector").
    """
    boot = {"n_resamples": cfg.bootstrap_resamples}
    sel = cfg.selector_spec
    specs = cfg.evaluator_specs()
    steps_cost = cfg.num_inference_steps * cfg.cfg_factor  # UNet evaluations per image
    arms: dict[str, dict] = {}

    def add_arm(name, model, n, per_prompt, chosen=None):
        selection = chosen is not None and n > 1  # best-of-n with n > 1 also pays for scoring its n samples
        arms[name] = {
            "model": model, "n": n,
            "unet_evals_per_prompt": n * steps_cost,
            "seconds_per_prompt": n * seconds[model] + (n * seconds["selector"] if selection else 0.0),
            "scores": {s: mean_ci(v, **boot) for s, v in per_prompt.items()},
            "per_prompt": {s: v.tolist() for s, v in per_prompt.items()},
        }
        if chosen is not None:
            arms[name]["chosen_index"] = chosen.tolist()

    models = ["base", "refl"] if "refl" in scores else ["base"]
    curves: dict[str, list[int]] = {}
    for model in models:
        s_model = scores[model]
        add_arm(f"{model}_random", model, 1, {s: s_model[s].mean(axis=1) for s in specs})
        if model == "refl" and not cfg.tuned_best_of:
            continue
        n_max = s_model[sel].shape[1]
        curves[model] = n_grid(n_max)
        for n in curves[model]:
            idx = best_of_n_indices(s_model[sel], n)  # (P,)
            rows = np.arange(len(idx))
            add_arm(f"{model}_best_of_{n}", model, n, {s: s_model[s][rows, idx] for s in specs}, chosen=idx)

    n_base = cfg.n_samples
    best_base = f"base_best_of_{n_base}"
    base_std = {s: float(np.sqrt(np.mean(scores["base"][s].var(axis=1, ddof=1)))) if n_base > 1 else float("nan")
                for s in specs}  # within-prompt spread: what selection among one prompt's samples acts on
    inflation = {}
    for s in specs:
        gain = arms[best_base]["scores"][s]["mean"] - arms["base_random"]["scores"][s]["mean"]
        inflation[s] = {"gain": gain, "std_within_prompt": base_std[s],
                        "standardised_gain": gain / base_std[s] if base_std[s] > 0 else float("nan")}
        if "refl" in scores:
            g = arms["refl_random"]["scores"][s]["mean"] - arms["base_random"]["scores"][s]["mean"]
            inflation[s]["refl_gain"] = g
            inflation[s]["refl_standardised_gain"] = g / base_std[s] if base_std[s] > 0 else float("nan")
    sel_gain = inflation[sel]["standardised_gain"]
    for s in specs:
        inflation[s]["selector_minus_evaluator"] = sel_gain - inflation[s]["standardised_gain"]

    win_rates: dict[str, dict] = {}
    if "refl" in scores:
        m = scores["refl"][sel].shape[1]
        refl_best = f"refl_best_of_{m}" if cfg.tuned_best_of else None
        for s in specs:
            base_all, refl_all = scores["base"][s], scores["refl"][s]  # (P, N), (P, M)
            best_b = np.asarray(arms[best_base]["per_prompt"][s])[:, None]  # (P, 1)
            pairs = {
                # same seeds: refl sample i against base sample i
                "refl_random_vs_base_random": win_shares(refl_all, base_all[:, :m]),
                f"refl_random_vs_{best_base}": win_shares(refl_all, best_b),
            }
            if refl_best:
                best_r = np.asarray(arms[refl_best]["per_prompt"][s])[:, None]  # (P, 1)
                pairs[f"{refl_best}_vs_base_random"] = win_shares(best_r, base_all)
                pairs[f"{refl_best}_vs_{best_base}"] = win_shares(best_r, best_b)
            win_rates[s] = {k: mean_ci(v, **boot) for k, v in pairs.items()}

    return {
        "prompts": prompts,
        "selector": sel,
        "evaluators": specs,
        "n_samples": n_base,
        "refl_samples": cfg.n_refl if "refl" in scores else 0,
        "n_grid": curves,
        "unet_evals_per_image": steps_cost,
        "seconds_per_image": seconds,
        "arms": arms,
        "win_rates": win_rates,
        "inflation": inflation,
        "diversity": {m: mean_ci(d[~np.isnan(d)], **boot) | {"per_prompt": d.tolist()} for m, d in diversity.items()},
    }


# ----------------------------------------------------------------------------- the run
class _Lazy:
    """Builds the sampler (the SD model) only if something must be drawn."""

    def __init__(self, cfg: CompareConfig, components=None):
        self.cfg, self.components, self.sampler = cfg, components, None

    def get(self) -> Sampler:
        if self.sampler is None:
            self.sampler = Sampler(self.cfg, self.components)
            self.components = None
        return self.sampler


def _scores_for(path: Path, fingerprint: str, images: np.ndarray, prompt: str, evaluators: dict,
                selector: CriticEvaluator) -> dict:
    """Per-image scores of one prompt's samples for every evaluator, reusing the cache file."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("fingerprint") != fingerprint or cached.get("n") != len(images):
        cached = {"fingerprint": fingerprint, "n": len(images), "scores": {}}
    # A critic retrained into the same folder has new content: its old scores are dropped, not reused.
    judged_by = cached.setdefault("evaluators", {})
    for spec, evaluator in evaluators.items():
        if judged_by.get(spec) != evaluator.fingerprint:
            cached["scores"].pop(spec, None)
            judged_by[spec] = evaluator.fingerprint
    changed = False
    prompts = [prompt] * len(images)
    if selector.name not in cached["scores"] or "diversity" not in cached:
        t0 = time.perf_counter()
        s, emb = selector.score_and_embed(images, prompts)  # (n,), (n, D); scores already on the CPU
        cached["selector_seconds"] = time.perf_counter() - t0
        cached["scores"][selector.name] = s.tolist()
        cached["diversity"] = pairwise_diversity(emb)
        changed = True
    for spec, evaluator in evaluators.items():
        if spec not in cached["scores"]:
            cached["scores"][spec] = np.asarray(evaluator(images, prompts), dtype=np.float64).tolist()
            changed = True
    if changed:
        write_json(path, cached)
    return cached


def run_compare(cfg: CompareConfig, components=None) -> dict:
    """Draw (or reuse) every sample, score every arm with every evaluator, write results.json and
    report.html into cfg.output_dir; returns the results. `components` (optional) replaces loading."""
    from tqdm.auto import tqdm

    from refl.report import write_report

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    prompts = load_prompts(cfg.prompts, cfg.prompt_column, cfg.max_prompts)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = ["base", "refl"] if cfg.lora else ["base"]
    counts = {"base": cfg.n_samples, "refl": cfg.n_refl}
    logger.info("%d prompts x (%s) samples, %d steps, CFG %.1f: %d UNet evaluations per image", len(prompts),
                " + ".join(f"{counts[m]} {m}" for m in models), cfg.num_inference_steps, cfg.guidance_scale,
                cfg.num_inference_steps * cfg.cfg_factor)

    specs = cfg.evaluator_specs()
    evaluators = {spec: create_evaluator(spec, device) for spec in specs}
    selector = evaluators[cfg.selector_spec]
    if not isinstance(selector, CriticEvaluator):
        raise TypeError(f"the selector must be a critic (directory or open_clip name), got {cfg.selector!r}")
    lazy = _Lazy(cfg, components)

    scores = {m: {s: [] for s in specs} for m in models}
    diversity = {m: [] for m in models}
    seconds = {m: [0.0, 0] for m in models} | {"selector": [0.0, 0]}
    drawn = {m: 0 for m in models}
    for p, prompt in enumerate(tqdm(prompts, desc="prompts", unit="prompt")):
        for model in models:
            seeds = sample_seeds(cfg, p, counts[model])
            fp = arm_fingerprint(cfg, model)
            path = samples_path(out, model, p)
            stored = load_samples(path, fp, seeds)
            if stored is None:
                sampler = lazy.get()
                sampler.set_arm(model)
                images, secs = sampler.timed_sample(prompt, seeds)
                save_samples(path, images, seeds, prompt, fp, secs)
                stored = {"images": images, "seeds": seeds, "seconds": secs}
                drawn[model] += len(seeds)
            cached = _scores_for(scores_path(out, model, p), fp, stored["images"], prompt,
                                 evaluators, selector)
            for s in specs:
                scores[model][s].append(cached["scores"][s])
            diversity[model].append(cached["diversity"])
            seconds[model][0] += stored["seconds"]
            seconds[model][1] += len(seeds)
            seconds["selector"][0] += cached["selector_seconds"]
            seconds["selector"][1] += len(seeds)
    logger.info("drew %s new images (the rest reused from %s)", drawn, out / "samples")

    per_image = {k: tot / max(n, 1) for k, (tot, n) in seconds.items()}
    results = compute_statistics(
        cfg, prompts, {m: {s: np.asarray(v) for s, v in d.items()} for m, d in scores.items()},
        {m: np.asarray(d, dtype=np.float64) for m, d in diversity.items()}, per_image)
    results["sampling_images_per_s"] = {m: 1.0 / per_image[m] if per_image[m] > 0 else float("nan") for m in models}
    results["throughput"] = _throughput(cfg, out, lazy, prompts[0])
    results["config"] = to_dict(cfg)
    results = finite_json(results)
    write_json(out / "results.json", results)
    report = write_report(results, out, cfg)
    logger.info("wrote %s and %s", out / "results.json", report)
    return results


def _throughput(cfg: CompareConfig, out: Path, lazy: _Lazy, prompt: str) -> dict | None:
    if not cfg.benchmark_throughput:
        return None
    path = out / "throughput.json"
    key = arm_fingerprint(cfg, "base") + f"|batch={cfg.batch_size}|device={cfg.device}|repeats={cfg.throughput_repeats}"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = measure_throughput(lazy.get(), prompt, cfg.throughput_repeats)
    write_json(path, {"key": key, "result": result})
    return result
