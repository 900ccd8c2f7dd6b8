"""Best-of-N selection against ReFL fine-tuning, on held-out prompts: the tuned model against the base
model with the critic picking 1 of N samples, scored by judges other than the selector, with the sampling
cost of each.

For every prompt the harness draws N base samples with fixed per-sample seeds, scores them with the
selector critic and keeps the best; it draws samples from the tuned model (base + LoRA) with the same
seeds, and optionally best-of-n on top of it. Arms (rows of the report; names made and read by
evaluation/arms.py):

- `base_random`        one random base sample (the mean over the N, i.e. its expectation);
- `base_best_of_{n}`   the selector's favourite among the FIRST n base samples, n = 1, 2, 4, ..., N
                       (nested subsets of the same draws: the whole reward-vs-n curve costs nothing extra);
- `refl_random`        one random tuned sample (mean over the tuned samples);
- `refl_best_of_{n}`   best-of-n on the tuned samples (when `tuned_best_of`).

Every arm is scored by every evaluator (the selector is always one of them: selecting on a critic
inflates that critic, exactly as fine-tuning on it does, so the other evaluators are the honest ones).

Output folder (evaluation/layout.py): `samples/{base,refl}/PPPP.npz` (uint8 images + seeds, written
once, never redrawn), `scores/{base,refl}/PPPP.json` (per-image scores per evaluator, cached),
`throughput.json`, `results.json` (every number, evaluation/stats.py) and `report.html`
(evaluation/report.py). A rerun reuses everything on disk, so an interrupted run resumes where it
stopped and the numbers of a finished run reproduce.

Seeds: sample i of prompt p uses `seed + SEED_STRIDE * p + i`, each with its own CPU `torch.Generator`,
so sample i is the same whatever the batch size (up to float rounding of batched kernels: at most 1
grey level) and on CPU or GPU, and base and tuned sample i start from the same noise.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.arms import MODELS
from evaluation.config import CompareConfig
from evaluation.layout import samples_path, scores_path
from evaluation.report import write_report
from evaluation.stats import compute_statistics, pairwise_diversity
from refl.components import DTYPES
from refl.prompts import read_prompt_file
from refl.sampling import encode_text, sample, seed_generators
from reward.evaluators import CriticEvaluator, create_evaluator
from runkit.config import resolve_device, save_config, to_dict
from runkit.files import atomic_write_bytes, content_hash, finite_json, paths_relative_to, write_json

logger = logging.getLogger(__name__)

SEED_STRIDE = 100_003  # per-prompt seed offset; larger than any sensible N, so no two samples share a seed


# ----------------------------------------------------------------------------- inputs and files
def read_heldout_prompts(path: str | os.PathLike, column: str = "prompt", limit: int = 0) -> list[str]:
    """The comparison's held-out prompts, the first `limit` of them (0: all), from a .txt file (one per
    line, blank lines skipped) or a .parquet/.csv `column`."""
    prompts = read_prompt_file(path, column, "prompts file", "prompt_column")
    return prompts[:limit] if limit else prompts


def sample_seeds(cfg: CompareConfig, prompt_index: int, n: int) -> np.ndarray:
    return cfg.seed + SEED_STRIDE * prompt_index + np.arange(n, dtype=np.int64)  # (n,)


def samples_fingerprint(cfg: CompareConfig, model: str) -> str:
    """Everything that determines the pixels of a model's samples ("base" or "refl"), model and LoRA by
    the content of their files, so a LoRA retrained into the same folder is drawn again; stored beside
    the samples."""
    keys = {"model": to_dict(cfg.model), "model_content": content_hash(cfg.model.name),
            "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale, "scheduler": cfg.scheduler,
            "eta": cfg.eta, "seed": cfg.seed, "mixed_precision": cfg.mixed_precision}
    if model == "refl":
        keys.update(lora=content_hash(cfg.lora), lora_scale=cfg.lora_scale)
    return json.dumps(keys, sort_keys=True)


def load_samples(path: Path, fingerprint: str, seeds: np.ndarray, prompt: str) -> dict | None:
    """Stored samples of one prompt and model; None when absent, drawn for another prompt (the prompts file
    changed under the same output folder) or from other files or settings."""
    if not path.is_file():
        return None
    with np.load(path) as data:
        stored = {k: data[k] for k in data.files}
    n = len(seeds)
    if str(stored["prompt"]) != prompt:
        logger.info("%s was drawn for another prompt (%r); drawing it again", path, str(stored["prompt"]))
        return None
    if str(stored["fingerprint"]) != fingerprint:
        logger.info("%s was drawn from other model files or settings; drawing it again", path)
        return None
    if len(stored["seeds"]) < n or not np.array_equal(stored["seeds"][:n], seeds):
        logger.info("%s holds other seeds than this run needs; drawing it again", path)
        return None
    return {"images": stored["images"][:n], "seeds": seeds,
            "seconds": float(stored["seconds"]) * n / len(stored["seeds"])}


def save_samples(path: Path, images: np.ndarray, seeds: np.ndarray, prompt: str, fingerprint: str,
                 seconds: float) -> None:
    atomic_write_bytes(path, lambda f: np.savez(f, images=images, seeds=seeds, prompt=np.array(prompt),
                                                 fingerprint=np.array(fingerprint),
                                                seconds=np.array(seconds)))


# ----------------------------------------------------------------------------- sampling
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    """A stock StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) driven for best-of-N: one text
    encoding per prompt and model, one CPU generator per image, LoRA switched on and off in place (no
    second copy of the model)."""

    def __init__(self, cfg: CompareConfig, components=None):
        from refl.components import load_components
        from refl.sampling import make_pipeline

        self.cfg = cfg
        self.device = resolve_device(cfg.device, cfg.mixed_precision)
        components = components if components is not None else load_components(cfg.model)
        self.pipe = make_pipeline(components, cfg.scheduler)
        self.pipe.to(self.device, DTYPES[cfg.mixed_precision])
        logger.info("sampling with %s (scheduler=%s), %d steps, guidance %g",
                    type(self.pipe.scheduler).__name__,
                    cfg.scheduler, cfg.num_inference_steps, cfg.guidance_scale)
        self.has_lora = bool(cfg.lora)
        if self.has_lora:
            from refl.lora import load_lora_into

            load_lora_into(self.pipe, cfg.lora, adapter_name="refl")
        self.model = None  # the model drawn from: "base", or "refl" (the LoRA switched on)
        self.set_model("base")
        self.images_drawn = 0  # counts every generated image (tests check resumed runs draw none)

    def set_model(self, model: str) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; models are {MODELS}")
        if model == self.model:
            return
        if model == "refl":
            if not self.has_lora:
                raise RuntimeError("the refl model needs cfg.lora")
            self.pipe.enable_lora()
            self.pipe.set_adapters(["refl"], adapter_weights=[self.cfg.lora_scale])
        elif self.has_lora:
            self.pipe.disable_lora()
        self.model = model

    @torch.no_grad()
    def sample(self, prompt: str, seeds: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Images of `prompt` for these seeds, uint8 (n, H, W, 3), drawn `batch_size` at a time."""
        batch_size = batch_size or self.cfg.batch_size
        # once per prompt, repeated per batch
        embeds = encode_text(self.pipe, prompt, self.cfg.guidance_scale)
        images = sample(self.pipe, embeds=embeds, seeds=seeds,
                        num_inference_steps=self.cfg.num_inference_steps,
                        guidance_scale=self.cfg.guidance_scale,
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
    sampler.set_model("base")
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
    result = {"batch_size": cfg.batch_size, "steps": cfg.num_inference_steps,
              "guidance_scale": cfg.guidance_scale,
              "device": str(sampler.device), "mixed_precision": cfg.mixed_precision, "repeats": len(ours_all),
              "ours_seconds_all": ours_all, "stock_seconds_all": stock_all, "ours_seconds": ours,
              "stock_seconds": stock,
              "ours_images_per_s": cfg.batch_size / ours, "stock_images_per_s": cfg.batch_size / stock,
              "ratio_vs_stock": stock / ours}
    logger.info("throughput: %.2f images/s (stock StableDiffusionPipeline %.2f images/s): ratio %.3f",
                result["ours_images_per_s"], result["stock_images_per_s"], result["ratio_vs_stock"])
    return result


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


def _samples_for(path: Path, fingerprint: str, seeds: np.ndarray, prompt: str, model: str,
                 lazy: _Lazy) -> tuple[dict, int]:
    """One prompt's samples of one model from the cache file, or drawn and stored; and how many were drawn."""
    stored = load_samples(path, fingerprint, seeds, prompt)
    if stored is not None:
        return stored, 0
    sampler = lazy.get()
    sampler.set_model(model)
    images, secs = sampler.timed_sample(prompt, seeds)
    save_samples(path, images, seeds, prompt, fingerprint, secs)
    return {"images": images, "seeds": seeds, "seconds": secs}, len(seeds)


def _scores_for(path: Path, fingerprint: str, images: np.ndarray, prompt: str, evaluators: dict,
                selector: CriticEvaluator) -> dict:
    """Per-image scores of one prompt's samples for every evaluator, reusing the cache file."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if (cached.get("fingerprint") != fingerprint or cached.get("n") != len(images)
            or cached.get("prompt") != prompt):
        cached = {"fingerprint": fingerprint, "n": len(images), "prompt": prompt, "scores": {}}
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

    from refl.lora import check_lora_dir

    out = Path(cfg.output_dir)
    prompts = read_heldout_prompts(cfg.prompts_file, cfg.prompt_column, cfg.max_prompts)
    if cfg.lora:  # before any sample is drawn; lora='' compares the base arms only
        check_lora_dir(cfg.lora)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.device, cfg.mixed_precision)
    models = ["base", "refl"] if cfg.lora else ["base"]
    counts = {"base": cfg.n_samples, "refl": cfg.n_refl}
    logger.info("%d prompts x (%s) samples, %d steps, CFG %.1f: %d UNet evaluations per image", len(prompts),
                " + ".join(f"{counts[m]} {m}" for m in models), cfg.num_inference_steps, cfg.guidance_scale,
                cfg.num_inference_steps * cfg.cfg_factor)

    specs = cfg.evaluator_specs()
    evaluators = {spec: create_evaluator(spec, device) for spec in specs}
    selector = evaluators[cfg.selector_spec]
    if not isinstance(selector, CriticEvaluator):
        raise TypeError(f"the selector must be a critic (directory or open_clip name), got {cfg.critic!r}")
    lazy = _Lazy(cfg, components)

    scores = {m: {s: [] for s in specs} for m in models}
    diversity = {m: [] for m in models}
    seconds = {m: [0.0, 0] for m in models} | {"selector": [0.0, 0]}
    drawn = {m: 0 for m in models}
    for p, prompt in enumerate(tqdm(prompts, desc="prompts", unit="prompt")):
        for model in models:
            seeds = sample_seeds(cfg, p, counts[model])
            fp = samples_fingerprint(cfg, model)
            stored, new = _samples_for(samples_path(out, model, p), fp, seeds, prompt, model, lazy)
            drawn[model] += new
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
    results["sampling_images_per_s"] = {m: 1.0 / per_image[m] if per_image[m] > 0 else float("nan")
                                        for m in models}
    results["throughput"] = _throughput(cfg, out, lazy, prompts[0])
    results["config"] = to_dict(cfg)
    results = finite_json(results)
    write_json(out / "results.json", paths_relative_to(results, out))  # a copied run folder names its own
    report = write_report(results, out, cfg)
    logger.info("wrote %s and %s", out / "results.json", report)
    return results


def _throughput(cfg: CompareConfig, out: Path, lazy: _Lazy, prompt: str) -> dict | None:
    if not cfg.benchmark_throughput:
        return None
    path = out / "throughput.json"
    key = (samples_fingerprint(cfg, "base")
           + f"|batch={cfg.batch_size}|device={cfg.device}|repeats={cfg.throughput_repeats}")
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = measure_throughput(lazy.get(), prompt, cfg.throughput_repeats)
    write_json(path, {"key": key, "result": result})
    return result
