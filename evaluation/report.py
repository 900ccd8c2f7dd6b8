"""report.html for a comparison run: what a person opens in a browser.

Per prompt a grid (base random | base best-of-N | ReFL | ReFL best-of-N) with every evaluator's score
under each image; a reward-versus-n plot per evaluator; tables of arm means with 95% intervals,
costs, win rates, the selection inflation, diversity and sampling throughput. Images and plots are
PNG files in `report_files/` beside the HTML (small images upscaled with NEAREST so pixels stay
visible). Screenshot it headless with Debian's chromium:

    chromium --headless --no-sandbox --disable-gpu --screenshot=out.png --window-size=1200,1600 \
        file://$PWD/runs/compare/report.html
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np

from evaluation.arms import arm_name
from evaluation.layout import samples_path, scores_path
from runkit.files import atomic_write_text

logger = logging.getLogger(__name__)

ASSET_DIR = "report_files"
CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1180px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.grid { display: flex; gap: 10px; flex-wrap: wrap; margin-bottom: 14px; }
.cell { text-align: center; font-size: 11px; }
.cell img { image-rendering: pixelated; border: 1px solid #999; display: block; margin: 0 auto 2px; }
.prompt { font-weight: 600; margin: 10px 0 4px; }
.plots img { width: 380px; margin-right: 8px; }
.note { color: #666; font-size: 12px; }
.sel { color: #a33; }
"""


def short_name(spec: str, labels: dict[str, str] | None = None) -> str:
    """An evaluator spec's name under images, in legends and in tables: its label in `labels` (keyed by the
    whole spec or by its kind, e.g. {"critic:runs/demo/critic/critic": "critic", "clip": "zero-shot CLIP"}),
    else the kind and the last part of its path (`critic:/long/path/critic` -> `critic:critic`)."""
    kind, _, arg = spec.partition(":")
    labels = labels or {}
    if spec in labels or kind in labels:
        return labels.get(spec, labels.get(kind))
    tail = Path(arg).name if "/" in arg else arg
    return f"{kind}:{tail}" if tail else kind


def _fmt(x: float, digits: int = 3) -> str:
    return ("nan" if x is None or not np.isfinite(x)
            else f"{x:.{digits}g}" if abs(x) >= 1000 else f"{x:.{digits}f}")


def _ci(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{_fmt(entry['mean'])} <span class='note'>[{_fmt(lo)}, {_fmt(hi)}]</span>"


def save_image(image: np.ndarray, path: Path, px: int) -> None:
    """uint8 (H, W, 3) -> PNG, upscaled by an integer factor with NEAREST to about `px` pixels."""
    from PIL import Image

    factor = max(1, px // max(image.shape[:2]))
    im = Image.fromarray(image)
    if factor > 1:
        im = im.resize((image.shape[1] * factor, image.shape[0] * factor), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def plot_reward_vs_n(results: dict, spec: str, path: Path) -> None:
    """Best-of-n curve(s) with 95% bands, log2 x-axis; ReFL single sample drawn across as a line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no GUI

    arms = results["arms"]
    fig = Figure(figsize=(4.6, 3.3), dpi=100)
    ax = fig.add_subplot()
    colours = {"base": "#1f5fa8", "refl": "#c8501e"}
    for model, grid in results["n_grid"].items():
        rows = [arms[arm_name(model, n)]["scores"][spec] for n in grid]
        mean = [r["mean"] for r in rows]
        ax.plot(grid, mean, "o-", color=colours[model], ms=3, label=f"{model} best-of-n")
        ax.fill_between(grid, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows],
                        color=colours[model], alpha=0.15, lw=0)
    x_max = max(max(g) for g in results["n_grid"].values())
    for model, style in (("base", ":"), ("refl", "--")):
        arm = arms.get(arm_name(model))
        if arm is None:
            continue
        entry = arm["scores"][spec]
        ax.axhline(entry["mean"], color=colours[model], ls=style, lw=1.2,
                   label="ReFL, one sample" if model == "refl" else "base, one sample")
        if model == "refl":
            ax.axhspan(*entry["ci95"], color=colours[model], alpha=0.08, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, x_max * 1.25)
    ax.set_xlabel("n (samples drawn per prompt, log2)")
    ax.set_ylabel("mean score over prompts")
    selector = " (selector)" if spec == results["selector"] else ""
    ax.set_title(short_name(spec) + selector, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _grid_cells(results: dict, out: Path, p: int, px: int) -> list[tuple[str, str, str, dict]]:
    """(label, sample note, image file relative to out, {spec: score}) for one prompt's grid."""
    cells = []
    arms = results["arms"]
    specs = results["evaluators"]
    wanted = [("base", None, "base random")]
    n_base = results["n_samples"]
    wanted.append(("base", arm_name("base", n_base), f"base best-of-{n_base}"))
    if arm_name("refl") in arms:
        wanted.append(("refl", None, "ReFL"))
        n_refl = results["n_tuned_samples"]
        if arm_name("refl", n_refl) in arms and n_refl > 1:
            wanted.append(("refl", arm_name("refl", n_refl), f"ReFL best-of-{n_refl}"))
    for model, arm, label in wanted:
        index = 0 if arm is None else int(arms[arm]["chosen_index"][p])  # sample 0 is a random draw
        with np.load(samples_path(out, model, p)) as data:
            image = data["images"][index]
            seed = int(data["seeds"][index])
        cache = json.loads(scores_path(out, model, p).read_text())
        scores = {s: cache["scores"][s][index] for s in specs}
        rel = f"{ASSET_DIR}/p{p:04d}_{model}_{index:03d}.png"
        save_image(image, out / rel, px)
        cells.append((label, f"#{index}, seed {seed}", rel, scores))
    return cells


def _title(results: dict, cfg) -> list[str]:
    has_refl = arm_name("refl") in results["arms"]
    return [
        f"<h1>Best-of-{results['n_samples']} selection" + (" vs ReFL" if has_refl else "") + "</h1>",
        f"<p class='note'>{len(results['prompts'])} held-out prompts; model "
        f"{html.escape(str(cfg.model.name))}"
        + (f"; LoRA {html.escape(cfg.lora)} (scale {cfg.lora_scale})" if has_refl else "; no LoRA given")
        + f"; {cfg.num_inference_steps} {html.escape(cfg.scheduler)} steps, CFG {cfg.guidance_scale}; "
        f"selector {html.escape(results['selector'])}. Intervals are 95% bootstrap over prompts. "
        "Scores of the selector are inflated by selection: judge best-of-N by the other evaluators.</p>",
    ]


def _reward_vs_n(results: dict, out: Path) -> list[str]:
    parts = ["<h2>Reward versus n</h2><div class='plots'>"]
    for k, spec in enumerate(results["evaluators"]):
        rel = f"{ASSET_DIR}/reward_vs_n_{k}.png"
        plot_reward_vs_n(results, spec, out / rel)
        parts.append(f"<img src='{rel}' alt='reward versus n, {html.escape(spec)}'>")
    parts.append("</div>")
    return parts


def _arms_table(results: dict, names: dict[str, str]) -> list[str]:
    specs = results["evaluators"]
    parts = ["<h2>Arms: mean score per prompt</h2><table><tr><th>arm</th><th>UNet evals / prompt</th>"
             "<th>seconds / prompt</th>" + "".join(f"<th>{names[s]}</th>" for s in specs) + "</tr>"]
    for arm, row in results["arms"].items():
        parts.append(f"<tr><td>{arm}</td><td>{row['unet_evals_per_prompt']}</td>"
                     f"<td>{_fmt(row['seconds_per_prompt'])}</td>"
                     + "".join(f"<td>{_ci(row['scores'][s])}</td>" for s in specs) + "</tr>")
    parts.append("</table><p class='note'>UNet evals = n x steps x (2 with CFG); seconds = sampling plus "
                 "selector scoring, measured on this machine.</p>")
    return parts


def _win_rates_table(results: dict, names: dict[str, str]) -> list[str]:
    if not results["win_rates"]:
        return []
    specs = results["evaluators"]
    comparisons = list(next(iter(results["win_rates"].values())))
    parts = ["<h2>Win rates of ReFL (ties count half)</h2><table><tr><th>comparison</th>"
             + "".join(f"<th>{names[s]}</th>" for s in specs) + "</tr>"]
    for c in comparisons:
        parts.append(f"<tr><td>{c.replace('_vs_', ' vs ')}</td>"
                     + "".join(f"<td>{_ci(results['win_rates'][s][c])}</td>" for s in specs) + "</tr>")
    parts.append("</table>")
    return parts


def _inflation_table(results: dict, names: dict[str, str]) -> list[str]:
    has_refl = arm_name("refl") in results["arms"]
    parts = ["<h2>Selection inflates its own critic</h2><table><tr><th>evaluator</th><th>best-of-N gain</th>"
             "<th>std within prompt</th><th>standardised gain</th><th>selector minus this</th>"
             + ("<th>ReFL standardised gain</th>" if has_refl else "") + "</tr>"]
    for s in results["evaluators"]:
        r = results["inflation"][s]
        parts.append(f"<tr><td>{names[s]}</td><td>{_fmt(r['gain'])}</td><td>{_fmt(r['std_within_prompt'])}</td>"
                     f"<td>{_fmt(r['standardised_gain'])}</td><td>{_fmt(r['selector_minus_evaluator'])}</td>"
                     + (f"<td>{_fmt(r['refl_standardised_gain'])}</td>" if has_refl else "") + "</tr>")
    parts.append("</table>")
    return parts


def _diversity_and_throughput(results: dict) -> list[str]:
    parts = ["<h2>Diversity and throughput</h2><table><tr><th>samples</th><th>mean pairwise 1 - cos "
             "(selector image embeddings)</th><th>images / s</th></tr>"]
    for model, d in results["diversity"].items():
        parts.append(f"<tr><td>{model}</td><td>{_ci(d)}</td>"
                     f"<td>{_fmt(results['sampling_images_per_s'].get(model, float('nan')))}</td></tr>")
    parts.append("</table>")
    tp = results.get("throughput")
    if tp:
        parts.append(f"<p>Best-of-N sampling: {_fmt(tp['ours_images_per_s'])} images/s vs a stock "
                     f"StableDiffusionPipeline call {_fmt(tp['stock_images_per_s'])} images/s "
                     f"(batch {tp['batch_size']}, {tp['steps']} steps, {html.escape(tp['device'])}): "
                     f"<b>ratio {_fmt(tp['ratio_vs_stock'])}</b>.</p>")
    return parts


def _sample_grids(results: dict, out: Path, cfg) -> list[str]:
    """The first `cfg.n_report_prompts` prompts, each a row of images with every evaluator's score."""
    shown = min(len(results["prompts"]), cfg.n_report_prompts)
    parts = [f"<h2>Samples ({shown} of {len(results['prompts'])} prompts)</h2>"]
    for p in range(shown):
        parts.append(f"<div class='prompt'>{p}. {html.escape(results['prompts'][p])}</div><div class='grid'>")
        for label, note, rel, scores in _grid_cells(results, out, p, cfg.report_image_px):
            lines = "<br>".join(f"{html.escape(short_name(s))}: {_fmt(v)}" for s, v in scores.items())
            parts.append(f"<div class='cell'><img src='{rel}' width='{cfg.report_image_px}' alt='{label}'>"
                         f"<b>{label}</b> <span class='note'>{note}</span><br>{lines}</div>")
        parts.append("</div>")
    return parts


def _arm_grids(results: dict, out: Path, cfg) -> list[str]:
    """For a few prompts, the first samples of every drawn arm side by side (the same seeds in each
    column), large enough to judge: what best-of-N picks from, and what the tuned model draws instead."""
    models = ["base"] + (["refl"] if arm_name("refl") in results["arms"] else [])
    shown = min(len(results["prompts"]), cfg.n_report_grid_prompts)
    if not shown or cfg.n_report_grid_samples < 1:
        return []
    parts = [f"<h2>Samples per arm ({shown} prompts, the same seeds in each column)</h2>"]
    for p in range(shown):
        parts.append(f"<div class='prompt'>{p}. {html.escape(results['prompts'][p])}</div>")
        for model in models:
            with np.load(samples_path(out, model, p)) as data:
                images, seeds = data["images"][: cfg.n_report_grid_samples], data["seeds"]
            cells = []
            for k, image in enumerate(images):
                rel = f"{ASSET_DIR}/p{p:04d}_{model}_{k:03d}.png"
                save_image(image, out / rel, cfg.report_image_px)
                cells.append(f"<div class='cell'><img src='{rel}' width='{cfg.report_image_px}' "
                             f"alt='{model} {k}'>seed {int(seeds[k])}</div>")
            label = {"base": "base", "refl": "ReFL"}[model]
            parts.append(f"<div class='grid'><div class='cell'><b>{label}</b></div>{''.join(cells)}</div>")
    return parts


def write_report(results: dict, out: str | Path, cfg, preamble: str = "") -> Path:
    """Write report.html (and its PNGs) for a finished run; returns its path.

    `cfg` is the run's CompareConfig; `preamble` is HTML placed after the summary table (the demo puts
    the critic's numbers there)."""
    out = Path(out)
    # Evaluator names for table headers; the selector is marked because its own scores are inflated.
    names = {s: html.escape(short_name(s))
             + (" <span class='sel'>(selector)</span>" if s == results["selector"] else "")
             for s in results["evaluators"]}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Best-of-N vs ReFL</title>"
             f"<style>{CSS}</style></head><body>",
             *_title(results, cfg),
             *_arms_table(results, names),  # the summary first, then the run's own story
             preamble,
             *_arm_grids(results, out, cfg),
             *_reward_vs_n(results, out),
             *_win_rates_table(results, names),
             *_inflation_table(results, names),
             *_diversity_and_throughput(results),
             *_sample_grids(results, out, cfg),
             "</body></html>"]
    return atomic_write_text(out / "report.html", "\n".join(parts))
