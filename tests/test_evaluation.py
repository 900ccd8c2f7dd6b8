"""Best-of-N vs ReFL (evaluation/) on tiny components: selection, statistics, report, resume, seeds, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from html_images import image_sources

from evaluation import harness as H
from evaluation import stats as S
from evaluation.config import CompareConfig
from reward.evaluators import register_evaluator
from runkit.config import load_config
from runkit.files import paths_relative_to

PROMPTS = ["a red square", "a blue circle on a green background", "a yellow triangle at the top"]
N = 8


def _brightness_factory(argument: str, device: str):
    """A plug-in evaluator as the toy world would register one: mean pixel value, torch-free."""
    return lambda images, prompts: images.reshape(len(images), -1).mean(axis=1) / 255.0


@pytest.fixture(scope="module")
def single_thread():
    # Two-thread OpenMP next to other busy processes on 2 shared cores spins and runs ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed_lora(folder: Path, seed: int) -> Path:
    """A tiny-preset LoRA whose B matrices are random (B starts at zero: tuned == base), so the tuned model
    differs from the base; no training is run here."""
    from refl.components import ModelConfig, load_components
    from refl.lora import LoraConfig, add_lora, save_lora

    components = load_components(ModelConfig(name="tiny"))
    add_lora(components, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():
        for name, p in components.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    save_lora(components, folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory, single_thread):
    """A prompts file, a perturbed tiny LoRA (ReFL is not run here) and the overrides of a tiny run."""
    root = tmp_path_factory.mktemp("compare")
    perturbed_lora(root / "lora", 1)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    register_evaluator("brightness", _brightness_factory, overwrite=True)
    overrides = ["model.name=tiny", f"lora={root / 'lora'}", f"prompts_file={root / 'prompts.txt'}",
                 f"n_samples={N}",
                 "batch_size=3", "num_inference_steps=4", "guidance_scale=3.0", "critic=tiny-clip",
                 "evaluators=[clip:tiny-clip, 'brightness:']", "bootstrap_resamples=300",
                 "report_image_px=64"]
    return {"root": root, "overrides": overrides}


def _cfg(world, out, *extra) -> CompareConfig:
    return load_config(CompareConfig, None, [*world["overrides"], f"output_dir={out}", *extra])


@pytest.fixture(scope="module")
def run(world):
    out = world["root"] / "run"
    cfg = _cfg(world, out)
    return {"cfg": cfg, "out": out, "results": H.run_compare(cfg)}


# ----------------------------------------------------------------------------- selection
def test_best_of_n_monotone_and_nested(run):
    res, cfg = run["results"], run["cfg"]
    sel = cfg.selector_spec
    assert res["n_grid"] == {"base": [1, 2, 4, 8], "refl": [1, 2, 4, 8]}
    for model in ("base", "refl"):
        raw = np.array([json.loads((run["out"] / "scores" / model
                                    / f"{p:04d}.json").read_text())["scores"][sel]
                        for p in range(len(PROMPTS))])  # (P, N)
        previous = None
        for n in res["n_grid"][model]:
            arm = res["arms"][f"{model}_best_of_{n}"]
            idx = np.array(arm["chosen_index"])
            assert (idx < n).all()  # nested: chosen among the first n samples
            chosen = np.array(arm["per_prompt"][sel])
            np.testing.assert_allclose(chosen, raw[np.arange(len(idx)), idx])
            np.testing.assert_allclose(chosen, raw[:, :n].max(axis=1))
            if previous is not None:
                assert (chosen >= previous - 1e-12).all()  # monotone per prompt, hence in the mean
            previous = chosen
        assert res["arms"][f"{model}_best_of_1"]["chosen_index"] == [0] * len(PROMPTS)
        np.testing.assert_allclose(res["arms"][f"{model}_random"]["per_prompt"][sel], raw.mean(axis=1))


def test_every_arm_scored_by_every_evaluator_and_costs(run):
    res = run["results"]
    assert res["evaluators"] == ["critic:tiny-clip", "clip:tiny-clip", "brightness:"]
    for arm in res["arms"].values():
        assert set(arm["scores"]) == set(res["evaluators"])
        assert arm["unet_evals_per_prompt"] == arm["n"] * 4 * 2  # n x steps x 2 (CFG)
        assert arm["seconds_per_prompt"] > 0
    for spec in res["evaluators"]:
        assert set(res["win_rates"][spec]) == {"refl_random_vs_base_random",
                                               f"refl_random_vs_base_best_of_{N}",
                                               f"refl_best_of_{N}_vs_base_random",
                                               f"refl_best_of_{N}_vs_base_best_of_{N}",
                                               f"base_best_of_{N}_vs_base_random"}
        for w in res["win_rates"][spec].values():
            assert 0.0 <= w["mean"] <= 1.0
    # the perturbed LoRA changes the pictures
    base = np.load(run["out"] / "samples" / "base" / "0000.npz")["images"]
    refl = np.load(run["out"] / "samples" / "refl" / "0000.npz")["images"]
    assert base.shape == refl.shape == (N, 16, 16, 3) and base.dtype == np.uint8
    assert np.abs(base.astype(int) - refl).max() > 10
    assert all(0 <= d <= 2 for m in ("base", "refl") for d in res["diversity"][m]["per_prompt"])
    assert res["throughput"]["ratio_vs_stock"] > 0 and res["sampling_images_per_s"]["base"] > 0


def test_inflation_with_selector_as_evaluator(run):
    res = run["results"]
    sel = res["selector"]
    infl = res["inflation"]
    assert set(infl) == set(res["evaluators"])
    assert infl[sel]["gain"] >= 0 and infl[sel]["standardised_gain"] >= 0
    assert infl[sel]["selector_minus_evaluator"] == 0
    for row in infl.values():
        expected = infl[sel]["standardised_gain"] - row["standardised_gain"]
        assert row["selector_minus_evaluator"] == pytest.approx(expected)
        assert np.isfinite(row["refl_standardised_gain"])


# ----------------------------------------------------------------------------- statistics
def test_mean_ci_contains_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    widths = []
    for n_prompts in (10, 40, 160):
        values = rng.normal(1.0, 1.0, size=n_prompts)
        ci = S.mean_ci(values, n_resamples=1000)
        assert ci["ci95"][0] <= ci["mean"] <= ci["ci95"][1]
        assert ci["mean"] == pytest.approx(values.mean())
        widths.append(ci["ci95"][1] - ci["ci95"][0])
    assert widths[0] > widths[1] > widths[2]


def test_win_shares_ties_half_and_best_of_indices():
    a = np.array([[1.0, 2.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(S.win_shares(a, b), [0.75, 0.25])
    np.testing.assert_allclose(S.win_shares(np.array([3.0, 0.0]), np.array([3.0, 1.0])), [0.5, 0.0])
    s = np.array([[0.1, 0.5, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    assert S.best_of_n_indices(s, 1).tolist() == [0, 0]
    assert S.best_of_n_indices(s, 3).tolist() == [1, 0]  # first of tied maxima
    assert S.best_of_n_indices(s, 4).tolist() == [3, 0]
    assert S.n_grid(8) == [1, 2, 4, 8] and S.n_grid(6) == [1, 2, 4, 6] and S.n_grid(1) == [1]
    e = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    assert S.pairwise_diversity(e[:1].repeat(4, 1)) == pytest.approx(0.0, abs=1e-6)
    assert 0 < S.pairwise_diversity(e) < 2


# ----------------------------------------------------------------------------- report
def test_arm_names_are_made_and_read_in_one_place(run):
    from evaluation.arms import arm_name, comparison_name, largest_best_of, parse_arm, parse_comparison

    assert [arm_name("base"), arm_name("refl", 4)] == ["base_random", "refl_best_of_4"]
    assert [parse_arm(a) for a in ("base_random", "refl_best_of_16")] == [("base", None), ("refl", 16)]
    # any tuned model's name: letters, digits, hyphens
    assert [parse_arm(a) for a in ("dpo_random", "kto-b2_best_of_4")] == [("dpo", None), ("kto-b2", 4)]
    for bad in ("base_best_of_", "base_best_of_x", "base", "refl_best_of_2_vs_base_random", "dpo_v2_random",
                "_random", "a/b_random"):
        with pytest.raises(ValueError):
            parse_arm(bad)
    for bad in ("dpo_v2", "a/b", "", "-x"):
        with pytest.raises(ValueError):
            arm_name(bad)
    assert parse_comparison(comparison_name("dpo_best_of_4", "kto_random")) == ("dpo_best_of_4", "kto_random")
    arms = run["results"]["arms"]
    assert all(arm_name(*parse_arm(a)) == a for a in arms)
    assert largest_best_of(arms, "base") == (f"base_best_of_{N}", N)
    assert largest_best_of(["base_random"], "base") is None


def test_short_names_of_evaluators():
    from evaluation.report import short_name

    assert short_name("critic:/long/path/critic") == "critic:critic"
    assert short_name("oracle:") == "oracle" and short_name("clip:ViT-L-14:openai") == "clip:ViT-L-14:openai"
    labels = {"critic:/long/path/critic": "critic*", "clip": "zero-shot CLIP"}
    assert short_name("critic:/long/path/critic", labels) == "critic*"
    assert short_name("critic:/other/critic", labels) == "critic:critic"
    assert short_name("clip:ViT-L-14:openai", labels) == "zero-shot CLIP"


def test_report_html_parses_and_images_exist(run):
    out = run["out"]
    sources = image_sources((out / "report.html").read_text(encoding="utf-8"))
    plots = [s for s in sources if "reward_vs_n" in s]
    assert len(plots) == 3  # one per evaluator
    changed = [s for s in sources if "/changed_" in s]
    assert len(changed) == 2 * 8  # the 8 same-seed pairs ReFL changed most, base and ReFL
    # base and ReFL, N each, per prompt
    grids = [s for s in sources if s not in plots and s not in changed][: 2 * N * len(PROMPTS)]
    # every sample, the same seeds
    assert len(grids) == 2 * N * len(PROMPTS) and len(set(grids)) == len(grids)
    # + a 4-image row per prompt
    assert len(sources) == 3 + len(changed) + 2 * N * len(PROMPTS) + 4 * len(PROMPTS)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert (page.index("Verdict") < page.index("Arms: mean score") < page.index("changed most")
            < page.index("Samples per arm") < page.index("Reward versus n"))
    for src in sources:
        assert not src.startswith(("/", "http")) and (out / src).is_file(), src
    from PIL import Image

    with Image.open(out / [s for s in sources if "p0000_base" in s][0]) as im:
        assert im.size == (64, 64)  # 16 px upscaled x4 with NEAREST


def test_the_report_leads_with_the_verdict_from_results_json(world, run, tmp_path):
    """The title states the question; the first lines give each arm's change from base on each judge (or the
    judge of truth) with its interval, its win rate against base and its cost, all from results.json."""
    import html as html_mod
    import re

    from evaluation.report import default_question, plot_reward_vs_n, verdict_lines, write_report

    res, out = run["results"], run["out"]
    page = (out / "report.html").read_text(encoding="utf-8")
    question = default_question(res)
    assert question.startswith("Does tuning (ReFL) beat drawing 8 samples")
    assert re.search(r"<h1>(.*?)</h1>", page).group(1) == html_mod.escape(question)
    verdict = page[page.index("Verdict"): page.index("Arms: mean score")]
    change = res["change_from_base"]
    assert list(change[res["selector"]]) == [f"base_best_of_{N}", "refl_random", f"refl_best_of_{N}"]
    for arm in change[res["selector"]]:
        for spec in res["evaluators"]:
            d = change[spec][arm]
            base = np.asarray(res["arms"]["base_random"]["per_prompt"][spec])
            tuned = np.asarray(res["arms"][arm]["per_prompt"][spec])
            assert d["mean"] == pytest.approx(np.mean(tuned - base))
            assert f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" in verdict
        w = res["win_rates"]["brightness:"][f"{arm}_vs_base_random"]
        assert f"{w['mean']:.0%} [{w['ci95'][0]:.0%}, {w['ci95'][1]:.0%}]" in verdict
    assert f"{N * 4 * 2} denoiser evaluations per image shown ({N}x one base sample)" in verdict
    assert "training cost not recorded" in verdict  # the world's LoRA comes from no run folder

    # With a judge of truth and the caller's names: the verdict reads that judge; no path names a judge.
    labels = {res["selector"]: "critic", "brightness": "brightness"}
    lines = verdict_lines(res, {s: labels.get(s, s) for s in res["evaluators"]}, truth="brightness:")
    assert len(lines) == 3
    assert all("brightness" in line and not re.search(r"critic [+-]", line) for line in lines)
    assert "best-of-8 by the critic" in lines[0]  # the selector named as the tables name it
    import reward
    from evaluation.report import judge_names

    critic = tmp_path / "my" / "critic"  # a selector named by a path
    torch.manual_seed(0)
    reward.create_critic(model_name="tiny-clip").save_pretrained(critic)
    cfg = _cfg(world, tmp_path / "out", f"critic={critic}", "max_prompts=1", "n_samples=2",
               "evaluators=['brightness:']", "benchmark_throughput=false")
    named = H.run_compare(cfg)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert str(tmp_path) not in page[: page.index("<h2>Settings")]  # only the settings name the files
    assert all("/" not in alt for alt in re.findall(r"alt='([^']*)'", page))
    sel = named["selector"]
    fig = plot_reward_vs_n(named, sel, tmp_path / "plot.png", judge_names(named)[sel])
    assert fig.axes[0].get_title() == "critic:critic (selector)"
    page = write_report(named, tmp_path / "out", cfg, truth="brightness:",
                        labels={named["selector"]: "my critic"}).read_text(encoding="utf-8")
    assert "my critic <span class='sel'>(selector)</span>" in page and "critic:critic" not in page


def test_the_report_shows_what_each_tuned_model_changed_most(run):
    """A grid per tuned model of the same-seed (base, tuned) pairs that differ most, largest first."""
    import re

    from evaluation.report import changed_most

    out = run["out"]
    diffs = []
    for p in range(len(PROMPTS)):
        base = np.load(out / "samples" / "base" / f"{p:04d}.npz")["images"][:N].astype(int)
        tuned = np.load(out / "samples" / "refl" / f"{p:04d}.npz")["images"][:N]
        diffs += [(np.abs(base[i] - tuned[i]).mean(), p, i) for i in range(N)]
    top = sorted(diffs, key=lambda x: (-x[0], x[1], x[2]))[:8]
    found = changed_most(out, "refl", len(PROMPTS), N, 8)
    assert [(p, i) for _, p, i in found] == [(p, i) for _, p, i in top]
    page = (out / "report.html").read_text(encoding="utf-8")
    shown = re.findall(r"changed_refl_p(\d{4})_refl_(\d{3})\.png", page)
    assert [(int(p), int(i)) for p, i in shown] == [(p, i) for _, p, i in top]
    assert f"changed {top[0][0]:.1f}" in page


# ----------------------------------------------------------------------------- resume and seeds
def test_interrupted_run_resumes_without_redrawing(world, run, monkeypatch):
    out = world["root"] / "resume"
    first = H.run_compare(_cfg(world, out, "max_prompts=2"))  # a run stopped after two prompts
    assert len(first["prompts"]) == 2
    files = sorted((out / "samples").rglob("*.npz"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    drawn = []
    original = H.Sampler.sample

    def counting(self, prompt, seeds, batch_size=None):
        drawn.append((prompt, len(seeds)))
        return original(self, prompt, seeds, batch_size)

    monkeypatch.setattr(H.Sampler, "sample", counting)
    full = H.run_compare(_cfg(world, out))
    # only the missing prompt, base and refl, a batch (batch_size 3) at a time
    assert drawn == [(PROMPTS[2], 3), (PROMPTS[2], 3), (PROMPTS[2], 2)] * 2
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    # same seeds, same samples as the uninterrupted run
    for f in (out / "samples").rglob("*.npz"):
        ref = run["out"] / f.relative_to(out)
        assert np.abs(np.load(f)["images"].astype(int) - np.load(ref)["images"]).max() <= 1

    # finished run, results and report deleted: nothing is drawn, not even the model is loaded
    (out / "results.json").unlink()
    (out / "report.html").unlink()
    all_mtimes = {f: f.stat().st_mtime_ns for f in (out / "samples").rglob("*.npz")}

    def refuse(*args, **kwargs):
        raise AssertionError("the rerun built a sampler")

    monkeypatch.setattr(H.Sampler, "__init__", refuse)
    again = H.run_compare(_cfg(world, out))
    assert {f: f.stat().st_mtime_ns for f in (out / "samples").rglob("*.npz")} == all_mtimes
    # stored with the paths inside the run folder relative to it (bad input 3: a copy named the original's)
    stored = (out / "results.json").read_text()
    assert json.loads(json.dumps(paths_relative_to(again, out))) == json.loads(stored)
    assert str(out) not in stored
    full_j, again_j = json.loads(json.dumps(full)), json.loads(json.dumps(again))
    assert full_j == again_j
    assert (out / "report.html").is_file()


def test_files_retrained_in_place_are_drawn_and_scored_again(world, tmp_path, monkeypatch):
    """Caches are keyed by content: a LoRA or critic rewritten in the same folder is never reused stale."""
    from safetensors.torch import load_file, save_file

    import reward

    lora = tmp_path / "lora"
    shutil.copytree(world["root"] / "lora", lora)
    critic = tmp_path / "critic"
    torch.manual_seed(0)
    reward.create_critic(model_name="tiny-clip").save_pretrained(critic)
    cfg = _cfg(world, tmp_path / "run", f"lora={lora}", "max_prompts=1", "n_samples=2", f"critic={critic}",
               "evaluators=['brightness:']", "benchmark_throughput=false")
    first = H.run_compare(cfg)
    drawn = []
    original = H.Sampler.sample

    def counting(self, prompt, seeds, batch_size=None):
        drawn.append(self.model)
        return original(self, prompt, seeds, batch_size)

    monkeypatch.setattr(H.Sampler, "sample", counting)
    H.run_compare(cfg)
    assert drawn == []  # same files, same settings: everything reused

    weights = lora / "pytorch_lora_weights.safetensors"
    state = load_file(weights)
    save_file({k: v + 0.5 if "lora_B" in k else v for k, v in state.items()}, weights)  # "retrained"
    torch.manual_seed(1)
    reward.create_critic(model_name="tiny-clip").save_pretrained(critic)
    second = H.run_compare(cfg)
    assert drawn == ["refl"]  # the base model did not change; the LoRA did
    sel = f"critic:{critic}"
    base_first, base_second = (np.asarray(r["arms"]["base_random"]["per_prompt"][sel])
                               for r in (first, second))
    assert not np.allclose(base_first, base_second)  # same base images, rescored by the new critic
    assert np.allclose(first["arms"]["base_random"]["per_prompt"]["brightness:"],
                       second["arms"]["base_random"]["per_prompt"]["brightness:"])

    drawn.clear()
    H.run_compare(_cfg(world, tmp_path / "run", f"lora={lora}", "max_prompts=1", "n_samples=2",
                       f"critic={critic}", "evaluators=['brightness:']", "benchmark_throughput=false",
                       "num_inference_steps=5"))
    assert drawn == ["base", "refl"]  # other settings: both models drawn again in place


def test_a_prompts_file_changed_under_the_same_output_folder_is_drawn_and_scored_again(world, tmp_path,
                                                                                         monkeypatch):
    """Samples and scores are stored by prompt index: a new prompt at an index is drawn and scored anew,
    never given the old prompt's images or scores."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    cfg = _cfg(world, tmp_path / "run", f"prompts_file={prompts}", "n_samples=2",
               "evaluators=['brightness:']",
               "benchmark_throughput=false")
    H.run_compare(cfg)
    drawn = []
    original = H.Sampler.sample

    def counting(self, prompt, seeds, batch_size=None):
        drawn.append((self.model, prompt))
        return original(self, prompt, seeds, batch_size)

    monkeypatch.setattr(H.Sampler, "sample", counting)
    prompts.write_text(PROMPTS[1] + "\n")
    second = H.run_compare(cfg)
    assert drawn == [("base", PROMPTS[1]), ("refl", PROMPTS[1])]
    fresh = H.run_compare(_cfg(world, tmp_path / "fresh", f"prompts_file={prompts}", "n_samples=2",
                               "evaluators=['brightness:']", "benchmark_throughput=false"))
    for arm in ("base_random", "refl_random"):
        scored = second["arms"][arm]["per_prompt"]
        assert len(scored) == 2  # the selector and brightness
        for spec, values in scored.items():
            assert np.allclose(values, fresh["arms"][arm]["per_prompt"][spec])


def test_sample_identical_across_batch_sizes(world, single_thread):
    cfg = _cfg(world, world["root"] / "unused", "lora=''")
    sampler = H.Sampler(cfg)
    seeds = np.arange(100, 106)
    whole = sampler.sample(PROMPTS[0], seeds, batch_size=6)  # (6, 16, 16, 3)
    pairs = sampler.sample(PROMPTS[0], seeds, batch_size=4)
    alone = sampler.sample(PROMPTS[0], seeds[3:4], batch_size=1)
    # batched float kernels differ in the last bits; after rounding to uint8 that is at most one grey level
    assert np.abs(whole.astype(int) - pairs).max() <= 1
    assert np.abs(whole[3:4].astype(int) - alone).max() <= 1
    assert (whole == pairs).mean() > 0.99
    other = sampler.sample(PROMPTS[0], seeds + 1, batch_size=6)
    assert np.abs(whole.astype(int) - other).max() > 10  # the seeds do matter


# ----------------------------------------------------------------------------- CLI
def test_configs_load_and_script_reuses_a_finished_run(world, run, capsys):
    from evaluation.cli import compare_main as main

    for name in ("compare_toy.yaml", "compare_sd15.yaml"):
        cfg = load_config(CompareConfig, Path("configs") / name)
        assert cfg.n_samples == 64 and cfg.lora and cfg.critic
    sd15 = load_config(CompareConfig, Path("configs/compare_sd15.yaml"))
    assert (sd15.num_inference_steps, sd15.guidance_scale, sd15.scheduler) == (50, 7.5, "ddim")
    args = ["--config", "configs/compare_toy.yaml"]
    for o in [*world["overrides"], f"output_dir={run['out']}"]:
        args += ["--set", o]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["selector"] == "critic:tiny-clip" and "base_random" in summary["means"]
    # One sample and best-of the most samples drawn, per model; the intermediate n only in results.json.
    assert set(summary["means"]) == {"base_random", f"base_best_of_{N}", "refl_random", f"refl_best_of_{N}"}
    assert main(["--set", "no_such_key=1"]) == 2


def test_bf16_harness_with_a_lora(world, tmp_path):
    results = H.run_compare(_cfg(world, tmp_path / "bf16", "mixed_precision=bf16", "max_prompts=1",
                                 "n_samples=2",
                                 "benchmark_throughput=false"))
    assert set(results["arms"]) >= {"base_random", "refl_random", "base_best_of_2"}
    assert all(np.isfinite(v["mean"]) for arm in results["arms"].values() for v in arm["scores"].values())


def test_a_missing_lora_is_refused_before_any_sample_is_drawn(world, tmp_path, monkeypatch):
    """It was found only when the first prompt's ReFL arm loaded it, after the base samples were drawn."""
    def must_not_sample(*args, **kwargs):
        raise AssertionError("drew samples before checking the LoRA")

    monkeypatch.setattr(H, "_samples_for", must_not_sample)
    (tmp_path / "empty").mkdir()
    for lora, names in [(tmp_path / "nowhere", "does not exist"),
                        (tmp_path / "empty", "holds no pytorch_lora_weights.safetensors")]:
        with pytest.raises(FileNotFoundError, match=names):
            H.run_compare(_cfg(world, tmp_path / "out", f"lora={lora}"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- several tuned models
def test_three_tuned_models_on_the_same_seeds_with_win_rates_between_each_and_their_training_cost(world,
                                                                                               tmp_path):
    from refl.compute import ComputeSpent, compute_of
    from runkit.files import write_json

    dpo, kto = perturbed_lora(tmp_path / "dpo" / "lora", 2), perturbed_lora(tmp_path / "kto" / "lora", 3)
    spent = compute_of(ComputeSpent(seconds_training=12.5, denoiser_forwards=640, denoiser_backwards=320))
    write_json(tmp_path / "dpo" / "result.json", {"updates": 10, "compute": spent})  # as a trainer writes it
    small = ["max_prompts=2", "n_samples=4", "benchmark_throughput=false", "n_report_grid_prompts=1"]
    res = H.run_compare(_cfg(world, tmp_path / "three", *small, f"loras.dpo={dpo}", f"loras.kto={kto}"))
    assert res["models"] == ["base", "refl", "dpo", "kto"]
    assert {"dpo_random", "dpo_best_of_4", "kto_random", "kto_best_of_4"} <= set(res["arms"])
    # every model drawn on the base's seeds, and each LoRA draws its own pictures
    images = {}
    for model in res["models"]:
        with np.load(tmp_path / "three" / "samples" / model / "0000.npz") as data:
            images[model] = data["images"]
            assert data["seeds"].tolist() == H.sample_seeds(_cfg(world, tmp_path), 0, 4).tolist()
    for a, b in (("refl", "dpo"), ("dpo", "kto"), ("base", "kto")):
        assert np.abs(images[a].astype(int) - images[b]).max() > 10
    # win rates: each tuned model against base, and each two tuned models against each other
    sel = res["selector"]
    keys = set(res["win_rates"][sel])
    for m in ("refl", "dpo", "kto"):
        assert {f"{m}_random_vs_base_random", f"{m}_best_of_4_vs_base_best_of_4"} <= keys
    for a, b in (("refl", "dpo"), ("refl", "kto"), ("dpo", "kto")):
        assert {f"{a}_random_vs_{b}_random", f"{a}_best_of_4_vs_{b}_best_of_4"} <= keys
    scores = {m: np.array([json.loads((tmp_path / "three" / "scores" / m / f"{p:04d}.json").read_text())
                           ["scores"]["brightness:"] for p in range(2)]) for m in ("dpo", "kto")}  # (P, 4)
    by_hand = np.where(scores["dpo"] > scores["kto"], 1.0, np.where(scores["dpo"] == scores["kto"], 0.5, 0.0))
    assert res["win_rates"]["brightness:"]["dpo_random_vs_kto_random"]["mean"] == pytest.approx(
        by_hand.mean(axis=1).mean())  # sample i against sample i: the same seeds
    assert set(res["inflation"][sel]["tuned"]) == {"refl", "dpo", "kto"}
    # the training cost each run folder recorded; a LoRA without a record says so
    assert res["training_compute"] == {"refl": None, "kto": None, "dpo": {**spent, "updates": 10}}
    page = (tmp_path / "three" / "report.html").read_text(encoding="utf-8")
    assert "DPO" in page and "KTO" in page

    # ReFL's arms read as they do without the other models: the same pictures and numbers (one sample's, by
    # the deterministic judge: the tiny critic, the selector, is drawn at random each time it loads)
    alone = H.run_compare(_cfg(world, tmp_path / "alone", *small))
    assert alone["models"] == ["base", "refl"]
    for model in ("base", "refl"):
        with np.load(tmp_path / "alone" / "samples" / model / "0000.npz") as data:
            assert np.array_equal(data["images"], images[model])
    for arm in ("base_random", "refl_random"):
        assert alone["arms"][arm]["per_prompt"]["brightness:"] == res["arms"][arm]["per_prompt"][
            "brightness:"]
    rates, key = alone["win_rates"]["brightness:"], "refl_random_vs_base_random"
    assert rates[key] == res["win_rates"]["brightness:"][key]
    # ReFL's four comparisons come first, best-of-N against one base sample last
    assert list(rates)[:4] == list(res["win_rates"]["brightness:"])[:4]
    assert list(rates)[-1] == list(res["win_rates"]["brightness:"])[-1] == "base_best_of_4_vs_base_random"


def test_tuned_models_are_named_and_checked_before_any_sample(world, tmp_path, monkeypatch):
    from runkit.config import ConfigError

    for bad, says in [("loras.base=x", "untuned model's name"), ("loras.dpo_v2=x", "not a model name"),
                      ("loras.refl=x", "both name the refl model")]:
        with pytest.raises((ValueError, ConfigError), match=says):
            _cfg(world, tmp_path / "out", bad)

    def must_not_sample(*args, **kwargs):
        raise AssertionError("drew samples before checking every LoRA")

    monkeypatch.setattr(H, "_samples_for", must_not_sample)
    with pytest.raises(FileNotFoundError, match="loras.kto: LoRA folder .*nowhere does not exist"):
        H.run_compare(_cfg(world, tmp_path / "out", f"loras.kto={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad input 3 (issue 34)
def test_the_selector_is_read_as_validate_reward_reads_a_critic(world, tmp_path):
    """Bad input 3: `critic=clip:NAME` said "unknown critic model 'clip'" in compare while validate-reward
    took it; one reading of a critic spec serves both."""
    res = H.run_compare(_cfg(world, tmp_path / "clip", "critic=clip:tiny-clip", "lora=''", "max_prompts=1",
                             "n_samples=2", "evaluators=['brightness:']", "benchmark_throughput=false"))
    assert res["selector"] == "clip:tiny-clip" and set(res["arms"]["base_best_of_2"]["scores"]) == {
        "clip:tiny-clip", "brightness:"}
    from reward.cli import _model_spec
    from reward.evaluators import model_spec

    for spec, kind, model in [("tiny-clip", "critic", "tiny-clip"), ("clip:tiny-clip", "clip", "tiny-clip"),
                              ("critic:runs/c", "critic", "runs/c"), ("ViT-L-14:openai", "critic",
                                                                      "ViT-L-14:openai")]:
        assert model_spec(spec) == (kind, model) and _model_spec(spec) == model
        assert _cfg(world, tmp_path, f"critic={spec}").selector_spec == f"{kind}:{model}"


def test_an_interrupt_loses_at_most_one_batch_and_the_log_says_how_long_is_left(world, tmp_path, monkeypatch,
                                                                                  caplog):
    """Bad input 3: compare kept a prompt's samples in memory until the prompt was done, so a Ctrl-C lost the
    prompt's work, and nothing said how long the drawing would take."""
    import logging

    from diffusers import StableDiffusionPipeline

    settings = ["lora=''", "max_prompts=1", "n_samples=6", "batch_size=2", "evaluators=['brightness:']",
                "benchmark_throughput=false"]
    out = tmp_path / "run"
    stock_call = StableDiffusionPipeline.__call__
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):  # Ctrl-C during the third batch
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return stock_call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", interrupted)
    with caplog.at_level(logging.INFO, logger="evaluation.harness"), pytest.raises(KeyboardInterrupt):
        H.run_compare(_cfg(world, out, *settings))
    assert "6 images to draw" in caplog.text and "drew 2 of 6 images" in caplog.text and "left" in caplog.text
    batches = out / "samples" / "base" / "0000-batches"
    assert sorted(p.name for p in batches.iterdir()) == ["000000.npz", "000002.npz"]

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", stock_call)
    drawn = []
    original = H.Sampler.sample

    def counting(self, prompt, seeds, batch_size=None):
        drawn.append(len(seeds))
        return original(self, prompt, seeds, batch_size)

    monkeypatch.setattr(H.Sampler, "sample", counting)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evaluation.harness"):
        # another batch size on the rerun: the batches written are reused as they are
        resumed = H.run_compare(_cfg(world, out, *settings[:3], "batch_size=4", *settings[4:]))
    assert drawn == [2] and "2 images to draw" in caplog.text  # the interrupted batch only
    assert not batches.exists() and (out / "samples" / "base" / "0000.npz").is_file()
    whole = H.run_compare(_cfg(world, tmp_path / "whole", *settings))
    with np.load(out / "samples" / "base" / "0000.npz") as a, \
            np.load(tmp_path / "whole" / "samples" / "base" / "0000.npz") as b:
        assert a["seeds"].tolist() == b["seeds"].tolist()
        assert np.abs(a["images"].astype(int) - b["images"]).max() <= 1  # batched kernels' last bits
    assert resumed["arms"]["base_random"]["n"] == whole["arms"]["base_random"]["n"] == 1
