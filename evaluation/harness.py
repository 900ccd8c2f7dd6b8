"""Best-of-N selection against tuned models (ReFL, DPO, KTO, any LoRA), on held-out prompts: each tuned
model against the base model with the critic picking 1 of N samples, scored by judges other than the
selector, with the sampling cost of each and the training cost its run folder recorded.

For every prompt the harness draws N base samples with fixed per-sample seeds, scores them with the
selector critic and keeps the best; it draws samples from each tuned model (base + its LoRA) with the same
seeds, and optionally best-of-n on top of each. Arms (rows of the report; names made and read by
evaluation/arms.py), for each model (`base`, `refl` from `lora`, and each name of `loras`):

- `base_random`         one random base sample (the mean over the N, i.e. its expectation);
- `base_best_of_{n}`    the selector's favourite among the FIRST n base samples, n = 1, 2, 4, ..., N
                        (nested subsets of the same draws: the whole reward-vs-n curve costs nothing extra);
- `{model}_random`      one random sample of a tuned model (mean over its samples);
- `{model}_best_of_{n}` best-of-n on its samples (when `tuned_best_of`).

Every arm is scored by every evaluator (the selector is always one of them: selecting on a critic
inflates that critic, exactly as fine-tuning on it does, so the other evaluators are the honest ones).

Output folder (evaluation/layout.py): `samples/{model}/PPPP.npz` (uint8 images + seeds, written once,
never redrawn; while a prompt is drawn, each batch is written to `samples/{model}/PPPP-batches/` as it
comes, so an interrupted run loses at most one batch), `scores/{model}/PPPP.json` (per-image scores per
evaluator, cached), `throughput.json`, `results.json` (every number, evaluation/stats.py) and
`report.html` (evaluation/report.py). A rerun reuses everything on disk, so an interrupted run resumes
where it stopped and the numbers of a finished run reproduce.

Seeds: sample i of prompt p uses `seed + SEED_STRIDE * p + i`, each with its own CPU `torch.Generator`,
so sample i is the same whatever the batch size (up to float rounding of batched kernels: at most 1
grey level) and on CPU or GPU, and base and tuned sample i start from the same noise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.arms import BASE
from evaluation.config import CompareConfig
from evaluation.layout import batch_path, batches_dir, samples_path, scores_path
from evaluation.report import write_report
from evaluation.stats import compute_statistics, pairwise_diversity
from refl.components import DTYPES
from refl.prompts import read_prompt_file
from refl.sampling import call_options, encode_text, sample, seed_generators
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
    """Everything that determines the pixels of a model's samples ("base" or a tuned model's name), model
    and LoRA by the content of their files, so a LoRA retrained into the same folder is drawn again; stored
    beside the samples."""
    keys = {"model": to_dict(cfg.model), "model_content": content_hash(cfg.model.name),
            "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale, "scheduler": cfg.scheduler,
            "eta": cfg.eta, "seed": cfg.seed, "mixed_precision": cfg.mixed_precision}
    if model != BASE:
        keys.update(lora=content_hash(cfg.tuned[model]), lora_scale=cfg.lora_scale)
    return json.dumps(keys, sort_keys=True)


def load_samples(path: Path, fingerprint: str, seeds: np.ndarray, prompt: str, partial: bool = False,
                 images: bool = True, quiet: bool = False) -> dict | None:
    """Stored samples of one prompt and model ("images", "seeds", "seconds"); None when absent, drawn for
    another prompt (the prompts file changed under the same output folder) or from other files or
    settings, or holding other seeds. `partial`: the file may hold only the first k < len(seeds) of them
    (a batch); then those k come back. `images=False` reads only the small fields (a count of what is
    stored); `quiet` logs nothing."""
    if not path.is_file():
        return None
    say = (lambda *a: None) if quiet else logger.info
    with np.load(path) as data:
        if str(data["prompt"]) != prompt:
            say("%s was drawn for another prompt (%r); drawing it again", path, str(data["prompt"]))
            return None
        if str(data["fingerprint"]) != fingerprint:
            say("%s was drawn from other model files or settings; drawing it again", path)
            return None
        stored_seeds = data["seeds"]
        k = min(len(stored_seeds), len(seeds))
        if (k < len(seeds) and not partial) or k == 0 or not np.array_equal(stored_seeds[:k], seeds[:k]):
            say("%s holds other seeds than this run needs; drawing it again", path)
            return None
        out = {"seeds": seeds[:k], "seconds": float(data["seconds"]) * k / len(stored_seeds)}
        if images:
            out["images"] = data["images"][:k]
    return out


def save_samples(path: Path, images: np.ndarray, seeds: np.ndarray, prompt: str, fingerprint: str,
                 seconds: float) -> None:
    atomic_write_bytes(path, lambda f: np.savez(f, images=images, seeds=seeds, prompt=np.array(prompt),
                                                 fingerprint=np.array(fingerprint),
                                                seconds=np.array(seconds)))


def stored_batches(path: Path, fingerprint: str, seeds: np.ndarray, prompt: str,
                   images: bool = True, quiet: bool = False) -> list[dict]:
    """The batches of an unfinished prompt already written (its `*-batches/` folder), in order from the first
    seed while they continue each other: what a resumed run need not draw again."""
    found, start = [], 0
    while start < len(seeds):
        batch = load_samples(batch_path(path, start), fingerprint, seeds[start:], prompt, partial=True,
                             images=images, quiet=quiet)
        if batch is None:
            break
        found.append(batch)
        start += len(batch["seeds"])
    return found


# ----------------------------------------------------------------------------- sampling
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Sampler:
    """The model family's stock pipeline (refl.sampling) driven for best-of-N: one text encoding per prompt
    and model, one CPU generator per image, each tuned model's LoRA loaded as its own adapter and switched on
    and off in place (no second copy of the model)."""

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
        self.loras = cfg.tuned
        if self.loras:
            import warnings

            from refl.lora import load_lora_into

            with warnings.catch_warnings():  # peft's caution on a second adapter: several are the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                for name, folder in self.loras.items():  # the adapter is named as the model
                    load_lora_into(self.pipe, folder, adapter_name=name)
        self.model = None  # the model drawn from: "base", or a tuned model (its LoRA switched on)
        self.set_model(BASE)
        self.images_drawn = 0  # counts every generated image (tests check resumed runs draw none)
        self._embeds = (None, None)  # (model, prompt) and its text encoding: once per prompt and model

    def set_model(self, model: str) -> None:
        if model != BASE and model not in self.loras:
            raise ValueError(f"unknown model {model!r}; models are {[BASE, *self.loras]}")
        if model == self.model:
            return
        if model != BASE:
            self.pipe.enable_lora()
            self.pipe.set_adapters([model], adapter_weights=[self.cfg.lora_scale])
        elif self.loras:
            self.pipe.disable_lora()
        self.model = model

    @torch.no_grad()
    def sample(self, prompt: str, seeds: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Images of `prompt` for these seeds, uint8 (n, H, W, 3), drawn `batch_size` at a time."""
        batch_size = batch_size or self.cfg.batch_size
        # once per prompt and model, reused by each of its batches
        if self._embeds[0] != (self.model, prompt):
            self._embeds = ((self.model, prompt), encode_text(self.pipe, prompt, self.cfg.guidance_scale))
        embeds = self._embeds[1]
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
                  guidance_scale=self.cfg.guidance_scale, generator=gens, output_type="np",
                  **call_options(self.pipe, self.cfg.eta))
        _sync(self.device)
        return time.perf_counter() - t0


def measure_throughput(sampler: Sampler, prompt: str, repeats: int = 1) -> dict:
    """Images/s of our best-of-N batch against a stock `pipe(prompt=[p] * B, ...)` call on the same batch
    and prompt (base model): one warm-up of each, then `repeats` alternating timed calls, fastest of each."""
    cfg = sampler.cfg
    sampler.set_model(BASE)
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
    logger.info("throughput: %.2f images/s (stock %s %.2f images/s): ratio %.3f", result["ours_images_per_s"],
                type(sampler.pipe).__name__, result["stock_images_per_s"], result["ratio_vs_stock"])
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


class DrawProgress:
    """How many images are left to draw and, from the pace of this run's own draws, about how long that
    takes: logged after a batch at most every `every` seconds, and after the last one."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.done, self.every = total, 0, every
        self.seconds = 0.0  # spent drawing this run's images
        self.logged_at = None  # when the estimate was last logged (perf_counter)

    def drew(self, n: int, seconds: float, where: str) -> None:
        self.done += n
        self.seconds += seconds
        now = time.perf_counter()
        if self.done < self.total and self.logged_at is not None and now - self.logged_at < self.every:
            return
        self.logged_at = now
        left = (self.total - self.done) * self.seconds / max(self.done, 1)
        logger.info("drew %d of %d images (%s); about %s left", self.done, self.total, where,
                    format_duration(left))


def format_duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 14 min`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _samples_for(path: Path, fingerprint: str, seeds: np.ndarray, prompt: str, model: str,
                 lazy: _Lazy, progress: DrawProgress | None = None) -> tuple[dict, int]:
    """One prompt's samples of one model from the cache file, or drawn and stored; and how many were drawn.
    Drawn a batch at a time, each batch written as it comes (`batch_path`), so a rerun after an interrupt
    draws only the batches that were not written; the batches become one file when the prompt is done."""
    stored = load_samples(path, fingerprint, seeds, prompt)
    if stored is not None:
        return stored, 0
    batches = stored_batches(path, fingerprint, seeds, prompt)
    start = sum(len(b["seeds"]) for b in batches)
    if start:
        logger.info("%s: %d of %d samples were drawn before; drawing the rest", path, start, len(seeds))
    drawn = 0
    while start < len(seeds):
        part = seeds[start : start + lazy.cfg.batch_size]
        sampler = lazy.get()
        sampler.set_model(model)
        images, secs = sampler.timed_sample(prompt, part)
        save_samples(batch_path(path, start), images, part, prompt, fingerprint, secs)
        batches.append({"images": images, "seeds": part, "seconds": secs})
        drawn += len(part)
        start += len(part)
        if progress is not None:
            progress.drew(len(part), secs, f"{model}, {path.parent.name}/{path.stem}")
    images = np.concatenate([b["images"] for b in batches])  # (n, H, W, 3)
    secs = sum(b["seconds"] for b in batches)
    save_samples(path, images, seeds, prompt, fingerprint, secs)
    shutil.rmtree(batches_dir(path), ignore_errors=True)  # the whole file holds them now
    return {"images": images, "seeds": seeds, "seconds": secs}, drawn


def images_to_draw(cfg: CompareConfig, out: Path, prompts: list[str]) -> int:
    """How many images a run still has to draw: the samples neither in a finished prompt's file nor in a
    written batch (only the small fields of the files are read)."""
    total = 0
    for model in cfg.models:
        fp = samples_fingerprint(cfg, model)
        for p, prompt in enumerate(prompts):
            seeds = sample_seeds(cfg, p, cfg.n_samples if model == BASE else cfg.n_tuned)
            path = samples_path(out, model, p)
            if load_samples(path, fp, seeds, prompt, images=False, quiet=True) is None:
                total += len(seeds) - sum(len(b["seeds"]) for b in stored_batches(path, fp, seeds, prompt,
                                                                                  images=False, quiet=True))
    return total


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
    from refl.compute import training_compute
    from refl.lora import check_lora_dir

    out = Path(cfg.output_dir)
    prompts = read_heldout_prompts(cfg.prompts_file, cfg.prompt_column, cfg.max_prompts)
    for name, folder in cfg.tuned.items():  # before any sample is drawn; no LoRA compares the base arms only
        try:
            check_lora_dir(folder)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{'lora' if name == 'refl' and cfg.lora else f'loras.{name}'}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg.device, cfg.mixed_precision)
    models = cfg.models
    counts = {m: cfg.n_samples if m == BASE else cfg.n_tuned for m in models}
    logger.info("%d prompts x (%s) samples, %d steps, CFG %.1f: %d UNet evaluations per image", len(prompts),
                " + ".join(f"{counts[m]} {m}" for m in models), cfg.num_inference_steps, cfg.guidance_scale,
                cfg.num_inference_steps * cfg.cfg_factor)

    specs = cfg.evaluator_specs()
    evaluators = {spec: create_evaluator(spec, device) for spec in specs}
    selector = evaluators[cfg.selector_spec]
    if not isinstance(selector, CriticEvaluator):
        raise TypeError(f"the selector must be a critic (directory or open_clip name), got {cfg.critic!r}")
    lazy = _Lazy(cfg, components)

    progress = DrawProgress(images_to_draw(cfg, out, prompts))
    if progress.total:
        logger.info("%d images to draw (the rest are on disk in %s)", progress.total, out / "samples")
    scores = {m: {s: [] for s in specs} for m in models}
    diversity = {m: [] for m in models}
    seconds = {m: [0.0, 0] for m in models} | {"selector": [0.0, 0]}
    drawn = {m: 0 for m in models}
    for p, prompt in enumerate(prompts):
        for model in models:
            seeds = sample_seeds(cfg, p, counts[model])
            fp = samples_fingerprint(cfg, model)
            stored, new = _samples_for(samples_path(out, model, p), fp, seeds, prompt, model, lazy, progress)
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
    # What each tuned model's training spent, as its run folder recorded it (None: no record there).
    results["training_compute"] = {m: training_compute(folder) for m, folder in cfg.tuned.items()}
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
    key = (samples_fingerprint(cfg, BASE)
           + f"|batch={cfg.batch_size}|device={cfg.device}|repeats={cfg.throughput_repeats}")
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = measure_throughput(lazy.get(), prompt, cfg.throughput_repeats)
    write_json(path, {"key": key, "result": result})
    return result
