"""report.html for a comparison run: what a person opens in a browser.

It leads with the verdict: a title that states the question, then one line per arm a reader weighs (base
best-of-N, each tuned model's one sample and best-of-M): what it changed from base's one sample on the
judge of truth when there is one (the toy world's oracle) or on each judge, its win rate against base,
and its cost (sampling per image shown, and the training its run folder recorded). Then the tables of arm
means with 95% intervals and costs; per tuned model the same-seed (base, tuned) pairs it changed most; a
reward-versus-n plot per judge; win rates, the selection inflation, diversity and sampling throughput; and
per prompt a grid (base random | base best-of-N | each tuned model | its best-of-M) with every judge's
score under each image. Judges are named as the caller's `labels` name them, never by a path. Every number
shown is in results.json. Images and plots are PNG files in `report_files/` beside the HTML (small images
upscaled with NEAREST so pixels stay visible). Screenshot it headless with Debian's chromium:

    chromium --headless --no-sandbox --disable-gpu --screenshot=out.png --window-size=1200,1600 \
        file://$PWD/runs/compare/report.html
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np

from evaluation.arms import BASE, arm_name, comparison_name, model_label, models_of, parse_arm
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
.verdict li { margin: 4px 0; font-size: 14px; }
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


def plot_reward_vs_n(results: dict, spec: str, path: Path, name: str | None = None):
    """Best-of-n curve(s) with 95% bands, log2 x-axis; each tuned model's one sample drawn across as a line.
    `name`: the judge as the tables name it (default: short_name). Returns the figure."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no GUI

    arms = results["arms"]
    fig = Figure(figsize=(4.6, 3.3), dpi=100)
    ax = fig.add_subplot()
    colours = model_colours(result_models(results))
    for model, grid in results["n_grid"].items():
        rows = [arms[arm_name(model, n)]["scores"][spec] for n in grid]
        mean = [r["mean"] for r in rows]
        ax.plot(grid, mean, "o-", color=colours[model], ms=3, label=f"{model_label(model)} best-of-n")
        ax.fill_between(grid, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows],
                        color=colours[model], alpha=0.15, lw=0)
    x_max = max(max(g) for g in results["n_grid"].values())
    for model in result_models(results):
        entry = arms[arm_name(model)]["scores"][spec]
        ax.axhline(entry["mean"], color=colours[model], ls=":" if model == BASE else "--", lw=1.2,
                   label=f"{model_label(model)}, one sample")
        if model != BASE:
            ax.axhspan(*entry["ci95"], color=colours[model], alpha=0.08, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, x_max * 1.25)
    ax.set_xlabel("n (samples drawn per prompt, log2)")
    ax.set_ylabel("mean score over prompts")
    selector = " (selector)" if spec == results["selector"] else ""
    ax.set_title((name or short_name(spec)) + selector, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return fig


def result_models(results: dict) -> list[str]:
    """The models of a comparison's results: base, then each tuned model (earlier results: from the arms)."""
    return results.get("models") or models_of(results["arms"])


def model_colours(models: list[str]) -> dict[str, str]:
    """One colour per model, base blue and the tuned models after it in a fixed order."""
    palette = ["#1f5fa8", "#c8501e", "#2e8b3a", "#8a3fa6", "#b58a00", "#1a9a9a", "#c0407a", "#555555"]
    return {m: palette[k % len(palette)] for k, m in enumerate(models)}


def _grid_cells(results: dict, out: Path, p: int, px: int) -> list[tuple[str, str, str, dict]]:
    """(label, sample note, image file relative to out, {spec: score}) for one prompt's grid."""
    cells = []
    arms = results["arms"]
    specs = results["evaluators"]
    wanted = [(BASE, None, "base random")]
    n_base = results["n_samples"]
    wanted.append((BASE, arm_name(BASE, n_base), f"base best-of-{n_base}"))
    n_tuned = results["n_tuned_samples"]
    for model in result_models(results)[1:]:
        wanted.append((model, None, model_label(model)))
        if arm_name(model, n_tuned) in arms and n_tuned > 1:
            wanted.append((model, arm_name(model, n_tuned), f"{model_label(model)} best-of-{n_tuned}"))
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


def default_question(results: dict) -> str:
    """The question a comparison answers, as its report's title."""
    tuned = [model_label(m) for m in result_models(results)[1:]]
    n = results["n_samples"]
    if not tuned:
        return f"How much does picking the best of {n} samples by the critic raise the judges' scores?"
    names = tuned[0] if len(tuned) == 1 else ", ".join(tuned[:-1]) + " or " + tuned[-1]
    return (f"Does tuning ({names}) beat drawing {n} samples and keeping the critic's pick? "
            f"{', '.join(tuned)} against the base model and its best-of-{n}")


def _title(results: dict, question: str, judges: dict[str, str]) -> list[str]:
    return [f"<h1>{html.escape(question)}</h1>",
            f"<p class='note'>{len(results['prompts'])} held-out prompts; the selector of best-of-n is the "
            f"{judges[results['selector']]}. Intervals are 95% bootstrap over prompts. The selector's own "
            "scores are inflated by selection: judge best-of-N by the other judges.</p>"]


def _settings(results: dict, cfg) -> list[str]:
    tuned = result_models(results)[1:]
    loras = "; ".join(f"{model_label(m)}: LoRA {html.escape(cfg.tuned[m])}" for m in tuned)
    return [f"<h2>Settings</h2><p class='note'>Model {html.escape(str(cfg.model.name))}"
            + (f"; {loras} (scale {cfg.lora_scale})" if tuned else "; no LoRA given")
            + f"; {cfg.num_inference_steps} {html.escape(cfg.scheduler)} steps, CFG {cfg.guidance_scale}; "
            f"selector {html.escape(results['selector'])}.</p>"]


def _count(n: float) -> str:
    return f"{int(round(n)):,}"


def training_cost(spent: dict | None) -> str:
    """A tuned model's training cost as the verdict states it."""
    if not spent:
        return "training cost not recorded (its run folder has no compute record)"
    return (f"training {spent['seconds_training']:.0f} s ({_count(spent['denoiser_forwards'])} denoiser "
            f"forwards and {_count(spent['denoiser_backwards'])} backwards in images over "
            f"{spent['updates']} updates; validation {spent['seconds_validating']:.0f} s more)")


def _signed(entry: dict, digits: int = 3) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _share(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return f"{entry['mean']:.0%} [{lo:.0%}, {hi:.0%}]"


def _arm_title(arm: str, selector: str) -> str:
    """A headline arm in the verdict: "base, best-of-64 by the critic", "ReFL, one sample"."""
    model, n = parse_arm(arm)
    if model == BASE:
        return f"base, best-of-{n} by the {selector}"
    return model_label(model) + (", one sample" if n is None else f", best-of-{n} by the {selector}")


def verdict_lines(results: dict, judges: dict[str, str], truth: str | None = None) -> list[str]:
    """One sentence (HTML) per headline arm: its change from base's one sample on the judge of truth (or on
    each judge), its win rate against base's one sample there, and its cost. Numbers from results.json."""
    change, wins, arms = results.get("change_from_base"), results["win_rates"], results["arms"]
    if not change:
        return []
    specs = [truth] if truth else results["evaluators"]
    per_image = results["unet_evals_per_image"]
    base_random = arm_name(BASE)
    lines = []
    for arm in next(iter(change.values())):
        model, n = parse_arm(arm)
        moved = "; ".join(f"{judges[s]} {_signed(change[s][arm])}" for s in specs)
        key = comparison_name(arm, base_random)
        won = "; ".join(f"{judges[s]} {_share(wins[s][key])}" for s in specs if key in wins.get(s, {}))
        evals = arms[arm]["unet_evals_per_prompt"]
        times = f"{evals // per_image}x one base sample"
        cost = (f"{_count(evals)} denoiser evaluations per image, as base" if evals == per_image else
                f"{_count(evals)} denoiser evaluations per image shown ({times})")
        if model != BASE:
            cost += "; " + training_cost(results.get("training_compute", {}).get(model))
        title = _arm_title(arm, judges[results["selector"]])
        lines.append(f"<li><b>{title}</b>: change from base's one sample {moved}; wins against base's one "
                     f"sample {won or '-'}; cost {cost}.</li>")
    return lines


def _verdict(results: dict, judges: dict[str, str], truth: str | None) -> list[str]:
    lines = verdict_lines(results, judges, truth)
    if not lines:
        return []
    on = (f"on the {judges[truth]}, the judge of truth here" if truth
          else "on each judge (the selector's own scores are inflated by selection)")
    return [f"<h2>Verdict</h2><p class='note'>Per arm, {on}: the mean over prompts of its score minus base's "
            "one sample, paired per prompt, and the share of comparisons it wins against a base sample "
            "(tuned models: the sample drawn from the same seed; ties half), with 95% intervals.</p>"
            "<ul class='verdict'>", *lines, "</ul>"]


def _reward_vs_n(results: dict, out: Path, judges: dict[str, str]) -> list[str]:
    parts = ["<h2>Reward versus n</h2><div class='plots'>"]
    for k, spec in enumerate(results["evaluators"]):
        rel = f"{ASSET_DIR}/reward_vs_n_{k}.png"
        plot_reward_vs_n(results, spec, out / rel, judges[spec])
        parts.append(f"<img src='{rel}' alt='reward versus n, {html.escape(judges[spec])}'>")
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
    parts = ["<h2>Win rates (ties count half)</h2><table><tr><th>comparison</th>"
             + "".join(f"<th>{names[s]}</th>" for s in specs) + "</tr>"]
    for c in comparisons:
        parts.append(f"<tr><td>{c.replace('_vs_', ' vs ')}</td>"
                     + "".join(f"<td>{_ci(results['win_rates'][s][c])}</td>" for s in specs) + "</tr>")
    parts.append("</table>")
    return parts


def _inflation_table(results: dict, names: dict[str, str]) -> list[str]:
    tuned = result_models(results)[1:]
    parts = ["<h2>Selection inflates its own critic</h2><table><tr><th>evaluator</th><th>best-of-N gain</th>"
             "<th>std within prompt</th><th>standardised gain</th><th>selector minus this</th>"
             + "".join(f"<th>{html.escape(model_label(m))} standardised gain</th>" for m in tuned) + "</tr>"]
    for s in results["evaluators"]:
        r = results["inflation"][s]
        parts.append(f"<tr><td>{names[s]}</td><td>{_fmt(r['gain'])}</td><td>{_fmt(r['std_within_prompt'])}</td>"
                     f"<td>{_fmt(r['standardised_gain'])}</td><td>{_fmt(r['selector_minus_evaluator'])}</td>"
                     + "".join(f"<td>{_fmt(_tuned_gain(r, m))}</td>" for m in tuned) + "</tr>")
    parts.append("</table>")
    return parts


def _tuned_gain(row: dict, model: str) -> float:
    """A tuned model's standardised gain in an inflation row (earlier results: ReFL's flat key only)."""
    tuned = row.get("tuned", {}).get(model)
    return tuned["standardised_gain"] if tuned else row.get(f"{model}_standardised_gain", float("nan"))


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


def _sample_grids(results: dict, out: Path, cfg, judges: dict[str, str]) -> list[str]:
    """The first `cfg.n_report_prompts` prompts, each a row of images with every evaluator's score."""
    shown = min(len(results["prompts"]), cfg.n_report_prompts)
    parts = [f"<h2>Samples ({shown} of {len(results['prompts'])} prompts)</h2>"]
    for p in range(shown):
        parts.append(f"<div class='prompt'>{p}. {html.escape(results['prompts'][p])}</div><div class='grid'>")
        for label, note, rel, scores in _grid_cells(results, out, p, cfg.report_image_px):
            lines = "<br>".join(f"{html.escape(judges[s])}: {_fmt(v)}" for s, v in scores.items())
            parts.append(f"<div class='cell'><img src='{rel}' width='{cfg.report_image_px}' alt='{label}'>"
                         f"<b>{label}</b> <span class='note'>{note}</span><br>{lines}</div>")
        parts.append("</div>")
    return parts


def _arm_grids(results: dict, out: Path, cfg) -> list[str]:
    """For a few prompts, the first samples of every drawn arm side by side (the same seeds in each
    column), large enough to judge: what best-of-N picks from, and what the tuned model draws instead."""
    models = result_models(results)
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
            label = html.escape(model_label(model))
            parts.append(f"<div class='grid'><div class='cell'><b>{label}</b></div>{''.join(cells)}</div>")
    return parts


def changed_most(out: Path, model: str, n_prompts: int, n_tuned: int, k: int) -> list[tuple[float, int, int]]:
    """The k same-seed (base, tuned) sample pairs of the first `n_prompts` prompts that `model` changed most:
    (mean absolute pixel difference in grey levels, prompt, sample index), largest first."""
    found = []
    for p in range(n_prompts):
        with np.load(samples_path(out, BASE, p)) as b, np.load(samples_path(out, model, p)) as t:
            m = min(n_tuned, len(t["images"]))
            diff = np.abs(b["images"][:m].astype(np.int16) - t["images"][:m]).mean(axis=(1, 2, 3))  # (m,)
        found += [(float(d), p, i) for i, d in enumerate(diff)]
    found.sort(key=lambda x: (-x[0], x[1], x[2]))
    return found[:k]


def _changed_most_grids(results: dict, out: Path, cfg, judges: dict[str, str],
                        truth: str | None) -> list[str]:
    """Per tuned model, the same-seed (base, tuned) pairs it changed most, base above and tuned below, with
    the judge of truth's (or every judge's) score under each: what the numbers mean, to the eye."""
    tuned = result_models(results)[1:]
    k = cfg.n_report_grid_samples
    n_prompts = min(len(results["prompts"]), cfg.n_report_prompts)
    if not tuned or k < 1 or not n_prompts:
        return []
    specs = [truth] if truth else results["evaluators"]
    parts = [f"<h2>What each tuned model changed most</h2><p class='note'>Per tuned model, the {k} pairs of "
             f"a base sample and the tuned sample from the same seed (first {n_prompts} prompts) that differ "
             "most, by mean absolute pixel difference (grey levels out of 255); base above, tuned below.</p>"]
    for model in tuned:
        pairs = changed_most(out, model, n_prompts, results["n_tuned_samples"], k)
        rows = {BASE: [], model: []}
        for diff, p, i in pairs:
            for m in (BASE, model):
                with np.load(samples_path(out, m, p)) as data:
                    image, seed = data["images"][i], int(data["seeds"][i])
                scores = json.loads(scores_path(out, m, p).read_text())["scores"]
                rel = f"{ASSET_DIR}/changed_{model}_p{p:04d}_{m}_{i:03d}.png"
                save_image(image, out / rel, cfg.report_image_px)
                lines = "<br>".join(f"{html.escape(judges[s])}: {_fmt(scores[s][i])}" for s in specs)
                note = (f"{html.escape(results['prompts'][p])}<br>seed {seed}" if m == BASE
                        else f"changed {diff:.1f}")
                alt = f"{html.escape(model_label(m))}, prompt {p}, seed {seed}"
                rows[m].append(f"<div class='cell'><img src='{rel}' width='{cfg.report_image_px}' "
                               f"alt='{alt}'>{note}<br>{lines}</div>")
        parts.append(f"<h3>{html.escape(model_label(model))}</h3>")
        for m in (BASE, model):
            parts.append(f"<div class='grid'><div class='cell'><b>{html.escape(model_label(m))}</b></div>"
                         f"{''.join(rows[m])}</div>")
    return parts


def judge_names(results: dict, labels: dict[str, str] | None = None) -> dict[str, str]:
    """Every judge's name in the report: its label in `labels` (by spec or kind, as short_name takes them),
    else short_name's (a path is cut to its last part)."""
    return {s: short_name(s, labels) for s in results["evaluators"]}


def write_report(results: dict, out: str | Path, cfg, preamble: str = "", *, question: str | None = None,
                 truth: str | None = None, labels: dict[str, str] | None = None, lead: str = "") -> Path:
    """Write report.html (and its PNGs) for a finished run; returns its path.

    `cfg` is the run's CompareConfig. `question`: the title (default: `default_question`); `truth`: the spec
    of the judge the verdict reads (the toy world's oracle), None = every judge; `labels`: how judges are
    named (short_name's labels); `lead`: HTML right after the verdict (the demo's promise); `preamble`: HTML
    after the summary table (the demo puts the critic's numbers there)."""
    out = Path(out)
    judges = judge_names(results, labels)
    if truth is not None and truth not in judges:
        raise ValueError(f"truth={truth!r} is not one of the run's judges {list(judges)}")
    # Evaluator names for table headers; the selector is marked because its own scores are inflated.
    names = {s: html.escape(judges[s]) + (" <span class='sel'>(selector)</span>" if s == results["selector"]
                                          else "")
             for s in results["evaluators"]}
    question = question or default_question(results)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(question)}</title>"
             f"<style>{CSS}</style></head><body>",
             *_title(results, question, {s: html.escape(j) for s, j in judges.items()}),
             *_verdict(results, {s: html.escape(j) for s, j in judges.items()}, truth),
             lead,
             *_arms_table(results, names),  # the summary, then what the images show, then the run's story
             *_changed_most_grids(results, out, cfg, judges, truth),
             preamble,
             *_arm_grids(results, out, cfg),
             *_reward_vs_n(results, out, judges),
             *_win_rates_table(results, names),
             *_inflation_table(results, names),
             *_diversity_and_throughput(results),
             *_sample_grids(results, out, cfg, judges),
             *_settings(results, cfg),
             "</body></html>"]
    return atomic_write_text(out / "report.html", "\n".join(parts))
