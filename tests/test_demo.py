"""The quick demo, end to end on the shipped toy world: community -> critic -> ReFL -> comparison ->
report."""

import json
import re

import numpy as np
import pytest
from html_images import image_sources

from toyworld.cli import demo_main


def test_quick_demo_writes_a_report_matching_results_json(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    page = (quick_demo / "report.html").read_text()
    sources = image_sources(page)
    assert sources and all((quick_demo / src).is_file() for src in sources)
    demo = results["demo"]
    acc = demo["critic"]["accuracy_vs_oracle"]["pairwise_accuracy"]
    zero_shot = demo["critic"]["zero_shot_clip_vs_oracle"]["pairwise_accuracy"]
    assert f"{acc:.1%}" in page and f"{zero_shot:.1%}" in page
    # Every arm the harness scored appears with the oracle's mean as results.json has it.
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    for arm in ("base_random", "refl_random"):
        mean = results["arms"][arm]["scores"][oracle]["mean"]
        assert re.search(rf"<td>{arm}</td>(?:(?!</tr>).)*?{mean:.3f}", page, flags=re.S), arm
    assert {"base", "ReFL"} <= set(demo["compare"])
    # The per-term breakdown recombines, with the oracle's weights, into the harness's oracle means.
    from evaluation.arms import largest_best_of
    from toyworld.oracle import combine_terms

    breakdown = demo["oracle_breakdown"]
    best, n = largest_best_of(results["arms"], "base")
    assert n == results["n_samples"]
    for label, arm in (("base", "base_random"), (f"base best-of-{n}", best), ("ReFL", "refl_random")):
        recombined = float(combine_terms({t: np.asarray(v) for t, v in breakdown["mean"][label].items()}))
        assert recombined == pytest.approx(results["arms"][arm]["scores"][oracle]["mean"], abs=1e-9), label
    carried = demo["community"]["community"]["term_agreement"]
    assert f"placement {carried['placement']:.0%}" in page and len(carried) == len(breakdown["weights"])
    assert "Where the hidden taste moved" in page and f"{breakdown['mean']['ReFL']['size']:.3f}" in page
    assert (quick_demo / demo["refl"]["lora"]).is_dir()
    # Paths inside the run folder are stored relative to it (bad input 3: a copy named the original's)
    assert demo["refl"]["lora"] == "refl/lora" and results["config"]["output_dir"] == "."
    # The stage files name their outputs relative to the run folder, so a copied folder names its own.
    assert json.loads((quick_demo / "critic"
                       / "critic_summary.json").read_text())["critic"] == "critic/critic"
    assert json.loads((quick_demo / "refl" / "result.json").read_text())["lora"] == "lora"
    # The demo's resolved config sits beside the harness's own, neither overwriting the other.
    saved = (quick_demo / "demo_config.yaml").read_text()
    assert "feed_guidance_scales" in saved and "gradient_accumulation" in saved  # the stage configs, nested


def test_quick_demo_measures_what_limits_the_critic_and_the_overoptimisation(quick_demo):
    from toyworld.demo.config import QUICK

    demo = json.loads((quick_demo / "results.json").read_text())["demo"]
    page = (quick_demo / "report.html").read_text()
    crit = demo["critic"]
    # The learning curve: each fraction of the pairs, then all of them (the demo's own critic).
    curve = crit["learning_curve"]
    assert [c["fraction"] for c in curve] == QUICK["critic_curve"] + [1.0]
    assert curve[-1]["accuracy_vs_oracle"] == crit["accuracy_vs_oracle"]
    assert curve[0]["n_pairs"] == round(QUICK["critic_curve"][0] * curve[-1]["n_pairs"])
    # Gap bins partition the held-out pairs, for the critic, zero-shot and the ceiling alike.
    n = crit["accuracy_vs_oracle"]["n_pairs"]
    for report in (crit["accuracy_vs_oracle"], crit["zero_shot_clip_vs_oracle"],
                   crit["ceiling"]["accuracy_vs_oracle"]):
        assert sum(b["n_pairs"] for b in report["by_gap"]) == n
    assert crit["ceiling"]["n_pairs"] > 0 and "What limits the critic" in page
    assert set(crit["realism"]) >= {"reaches_accuracy", "interval_above_zero_shot", "realistic"}
    # The feed: one summary entry per distinct guidance scale, each with its share of the images.
    feed = demo["community"]["feed"]
    guidance = QUICK["community.feed_guidance_scales"]
    assert {float(g) for g in feed} == set(guidance)
    assert sum(v["images"] for v in feed.values()) == demo["community"]["community"]["n_images"]
    # Validation from update 0, the oracle's peak and every guard's pick on that curve.
    over = demo["overoptimisation"]
    assert over["picks"]["no guard (last update)"]["update"] == QUICK["refl.train.max_updates"]
    assert over["oracle_peak"]["oracle"] >= max(p["oracle"] for p in over["picks"].values())
    assert "sweep rule" in over["picks"] and (quick_demo / "overoptimisation.png").is_file()
    assert "Over-optimisation" in page
    # The report opens with whether the promise held, from the same per-prompt numbers as results.json.
    results = json.loads((quick_demo / "results.json").read_text())
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    per_prompt = np.asarray(results["arms"]["refl_random"]["per_prompt"][oracle]) - np.asarray(
        results["arms"]["base_random"]["per_prompt"][oracle])
    promise = demo["promise"]
    assert promise["refl_minus_base"]["mean"] == pytest.approx(per_prompt.mean())
    assert promise["held"] == (promise["refl_minus_base"]["ci95"][0] > 0
                               and promise["fidelity_minus_base"] >= -0.05)
    assert (f"{promise['refl_minus_base']['mean']:+.3f}"
            in page.split("The critic against the hidden taste")[0])
    assert "n_samples" in (quick_demo / "config.yaml").read_text()


def test_rerun_reuses_every_stage(quick_demo, capfd):
    before = {p: p.stat().st_mtime for p in (quick_demo / "samples").rglob("*.npz")}
    assert before
    assert demo_main(["--out", str(quick_demo), "--quick"]) == 0
    assert {p: p.stat().st_mtime for p in (quick_demo / "samples").rglob("*.npz")} == before
    printed = capfd.readouterr()
    assert "critic vs oracle" in printed.out
    # The comparison loads the base model in its dtype and the LoRA: no warning a user cannot act on.
    for needless in ("should be kept in float32: []", "No LoRA keys associated to"):
        assert needless not in printed.err
    # Stopping after the community stage reports the feedback and its realism, nothing after it.
    assert demo_main(["--out", str(quick_demo), "--quick", "--until", "community"]) == 0
    printed = capfd.readouterr().out
    assert "realistic:" in printed and "critic vs oracle" not in printed


def test_a_changed_knob_reruns_its_stage_and_only_what_depends_on_it(quick_demo, tmp_path):
    import shutil

    from runkit.files import content_hash

    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)

    def stamps(folder):
        return {p: p.stat().st_mtime_ns for p in (out / folder).rglob("*") if p.is_file()}

    community, critic, base = stamps("community"), stamps("critic"), stamps("samples/base")
    tuned, lora = stamps("samples/refl"), content_hash(out / "refl" / "lora")
    # The original out of reach: the copy must read its own community pairs, critic and LoRA.
    away = quick_demo.with_name(quick_demo.name + "-away")
    quick_demo.rename(away)
    try:
        assert demo_main(["--out", str(out), "--quick", "--set", "refl.train.lr=0.01"]) == 0
    finally:
        away.rename(quick_demo)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lora"] == "refl/lora"  # relative to the run folder
    assert results["selector"] == f"critic:{out / 'critic' / 'critic'}"
    trained = (out / "refl" / "config.yaml").read_text()
    assert str(quick_demo) not in trained and str(out / "critic" / "critic") in trained
    assert stamps("community") == community and stamps("critic") == critic  # their inputs did not change
    assert stamps("samples/base") == base
    assert content_hash(out / "refl" / "lora") != lora  # ReFL ran again with the new LR ...
    assert all(stamps("samples/refl")[p] != t for p, t in tuned.items())  # ... and its samples were redrawn


def test_bad_override_is_named(tmp_path, capsys, monkeypatch):
    from toyworld.demo import DemoConfig

    assert demo_main(["--out", str(tmp_path), "--quick", "--set", "refl_updatez=3"]) == 2
    assert "refl_updatez" in capsys.readouterr().err
    # A renamed key names its new place (shown on an example: no table is kept before the first release).
    monkeypatch.setattr(DemoConfig, "RENAMED", {"refl_lr": "refl.train.lr"}, raising=False)
    assert demo_main(["--out", str(tmp_path), "--quick", "--set", "refl_lr=0.01"]) == 2
    assert "refl.train.lr" in capsys.readouterr().err
    # What ties the stages together is the demo's to set, not the stage config's.
    assert demo_main(["--out", str(tmp_path), "--quick", "--set", "refl.train.output_dir=elsewhere"]) == 2
    assert "set by the demo" in capsys.readouterr().err
    # More held-out prompts than a use's share: refused at start, not when its stage comes.
    assert demo_main(["--out", str(tmp_path / "many"), "--quick", "--set", "n_compare_prompts=51"]) == 2
    err = capsys.readouterr().err
    assert "n_compare_prompts=51" in err and "ask for 0 to 50" in err
    assert not (tmp_path / "many" / "community").exists()


def test_ablation_pairs_each_variant_with_the_same_base_samples(quick_demo):
    from toyworld.ablation import run_ablation

    summary = run_ablation(quick_demo, {"frozen": ["refl.train.lr=0", "refl.train.max_updates=1"],
                                        "kl": ["refl.train.max_updates=1", "refl.step.kl_weight=1"]},
                           n_prompts=2, n_samples=2)
    frozen, kl = summary["variants"]["frozen"], summary["variants"]["kl"]
    # lr 0 leaves LoRA B at zero, so the tuned samples are the base samples: every paired difference is 0.
    assert all(d["mean"] == 0.0 for d in frozen["difference_from_base"].values())
    assert all(d["mean"] == 0.0 for d in frozen["oracle_terms_difference"].values())
    assert "train/kl_loss" in kl["train"] and "train/kl_loss" not in frozen["train"]
    root = quick_demo / "ablation"
    frozen_base = sorted((root / "frozen" / "seed-0" / "samples" / "base").glob("*.npz"))
    assert frozen_base
    for a, b in zip(frozen_base, sorted((root / "kl" / "seed-0" / "samples" / "base").glob("*.npz"))):
        assert np.array_equal(np.load(a)["images"], np.load(b)["images"])
    assert "| frozen |" in (root / "ablation.md").read_text()


def test_ablation_script_names_bad_input(quick_demo, tmp_path, capsys):

    from toyworld.cli import ablation_main

    assert ablation_main(["--demo", str(tmp_path)]) == 2
    assert "is not a finished demo" in capsys.readouterr().err
    assert ablation_main(["--demo", str(quick_demo), "--variants", "typo: refl_kl_wieght=1"]) == 2
    assert "refl_kl_wieght" in capsys.readouterr().err
    assert ablation_main(["--demo", str(quick_demo), "--variants", "no colon"]) == 2
    assert "must look like" in capsys.readouterr().err


def test_world_study_trains_each_seed_and_reports_the_spread(quick_demo):
    from runkit.files import content_hash
    from toyworld.study import PLAIN, run_study

    results = json.loads((quick_demo / "results.json").read_text())
    summary = run_study(quick_demo, seeds=(0, 1))
    assert summary["seeds"] == [0, 1] and list(summary["variants"]) == [PLAIN]
    plain = summary["variants"][PLAIN]
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    seed0, seed1 = plain["per_seed"][0]["judges"][oracle], plain["per_seed"][1]["judges"][oracle]
    # Seed 0 is the demo's own run; base and best-of-N are the same samples for every seed.
    assert seed0["refl"] == results["arms"]["refl_random"]["scores"][oracle]
    assert seed0["base"] == seed1["base"] and seed0["best_of_n"] == seed1["best_of_n"]
    seed1_lora = quick_demo / "study" / "refl" / "seed-1" / "refl" / "lora"
    assert content_hash(quick_demo / "refl" / "lora") != content_hash(seed1_lora)
    spread = plain["across_seeds"]["judges"][oracle]["refl"]
    values = [seed0["refl"]["mean"], seed1["refl"]["mean"]]
    assert (spread["mean"] == pytest.approx(np.mean(values))
            and spread["std"] == pytest.approx(np.std(values, ddof=1)))
    assert set(plain["across_seeds"]["terms"]) >= {"vivid", "size", "placement"}
    table = (quick_demo / "study" / "world.md").read_text()
    assert "ReFL - base, seed 1" in table and "oracle term: size" in table
    # The demo's own report is left as the demo wrote it.
    assert json.loads((quick_demo / "results.json").read_text()) == results


def test_guard_study_trains_the_ensemble_and_compares_the_selected_lora(quick_demo):
    from refl.config import ReflConfig
    from runkit.config import load_config
    from toyworld.demo import DemoConfig
    from toyworld.study import PLAIN, run_study

    results = json.loads((quick_demo / "results.json").read_text())
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    variants = {PLAIN: [], "guarded": ["n_critic_members=2", "refl.reward.ensemble_penalty=1",
                                       "refl.train.select_by=clip:{clip_model}"]}
    summary = run_study(quick_demo, seeds=(0,), study="guard", variants=variants)
    guarded = summary["variants"]["guarded"]
    assert (guarded["overrides"][-1]
            == "refl.train.select_by=clip:"
               f"{load_config(DemoConfig, quick_demo / 'demo_config.yaml').clip_model}")
    run = quick_demo / "study" / "guarded" / "seed-0"
    refl = json.loads((run / "refl" / "result.json").read_text())
    # The ensemble's second member was trained for the study, and ReFL's reward read both members.
    member = quick_demo / "study" / "critics" / "member-1" / "critic"
    trained = load_config(ReflConfig, run / "refl" / "config.yaml")
    assert trained.reward.critic == [str(quick_demo / "critic" / "critic"), str(member)] and member.is_dir()
    # The comparison judged the LoRA that selection kept, not the last one.
    compared = json.loads((run / "results.json").read_text())
    # results.json names paths inside its folder relative to it
    assert (str(run / compared["config"]["lora"]) == str(run / "refl" / refl["lora_best"])
            != str(run / "refl" / refl["lora"]))
    assert guarded["per_seed"][0]["selected_update"] == refl["best_update"]
    # The plain variant at the demo's seed is the demo's own run; the table names both variants.
    assert summary["variants"][PLAIN]["per_seed"][0]["judges"][oracle]["refl"] == \
        results["arms"]["refl_random"]["scores"][oracle]
    table = (quick_demo / "study" / "guard.md").read_text()
    assert "| guarded - base |" in table and "### guarded" in table


def test_a_changed_community_behaviour_rebuilds_pairs_without_drawing_again(quick_demo, tmp_path):
    import shutil

    from refl.components import load_components
    from runkit.config import load_config, override
    from toyworld.demo import DemoConfig
    from toyworld.demo.stages import stage_community

    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    cache = {p: p.stat().st_mtime_ns for p in (out / "cache").glob("samples-*.npz")}
    assert len(cache) == 2  # the community's feed and the held-out generations
    cfg = override(load_config(DemoConfig, out / "demo_config.yaml"),
                   [f"output_dir={out}", "community.behaviour.judgement_noise=0.5"])
    before = json.loads((out / "community" / "community.json").read_text())["community"]
    after = stage_community(cfg, load_components(cfg.sd_model), out / "community")["community"]
    assert after["config"]["judgement_noise"] == 0.5 and after != before
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").glob("samples-*.npz")} == cache
    assert "realism" in after and set(after["term_spread"]) == set(before["term_spread"])


def test_sweep_chooses_by_the_rule_on_the_demos_critic(quick_demo, monkeypatch):
    import toyworld.sweep as sweep

    # Two tiny settings on the quick demo's critic; the rule and its judges are the real ones.
    monkeypatch.setattr(sweep, "COMMON", ["refl.train.max_updates=2", "refl.train.validate_every=1",
                                          "refl.train.validate_at_start=true"])
    grid = {"lr 0": ["refl.train.lr=0"], "lr 1e-2": ["refl.train.lr=1e-2"]}
    result = sweep.run_sweep(quick_demo, grid)
    assert result["choice"]["setting"] in grid and 0 <= result["choice"]["update"] <= 2
    for name, curve in result["curves"].items():
        assert [r["update"] for r in curve] == [0, 1, 2]
        assert not any("oracle" in k for r in curve for k in r)  # what the rule saw
        assert "oracle_peak" in result["evaluation"][name]  # evaluated only after the choice
    # lr 0 never moves: every update ties with the base, so its best admissible update is the base.
    assert result["per_run"]["lr 0"]["update"] == 0
    table = (quick_demo / "sweep" / "sweep.md").read_text()
    assert "Chosen:" in table
    # judges named as the report names them, not by the zero-shot model's path
    assert "zero-shot CLIP (update 0 -> it; may drop 1)" in table and "clip:" not in table
    # A setting whose validation lacks a judge the rule holds is refused before anything trains.
    with pytest.raises(ValueError, match="fidelity:"):
        sweep.run_sweep(quick_demo, {"no fidelity": ["refl.train.lr=1e-2",
                                                     'refl.train.heldout_evaluators=["oracle:"]']})
    assert not (quick_demo / "sweep" / "no-fidelity").exists()


def test_a_demo_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    from toyworld.cli import demo_main

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert demo_main(["--out", str(notes), "--quick"]) == 2
    assert "is a file; name a folder" in capsys.readouterr().err and notes.read_text() == "mine"


def test_critic_study_measures_every_checkpoint_and_its_seed_0_is_the_demos_critic(quick_demo):
    from toyworld.critic_study import critic_study_markdown, run_critic_study

    summary = run_critic_study(quick_demo, seeds=(0, 1), fractions=(0.5, 1.0), every=2)
    demo_critic = json.loads((quick_demo / "critic" / "critic_summary.json").read_text())
    demo_half = next(p for p in demo_critic["learning_curve"] if p["fraction"] == 0.5)
    runs = {(r["fraction"], r["seed"]): r for r in summary["runs"]}
    assert set(runs) == {(0.5, 0), (0.5, 1), (1.0, 0), (1.0, 1)}
    for run in runs.values():
        updates = [c["update"] for c in run["curve"]]
        assert updates == sorted(updates) and updates[-1] == run["updates"]
        assert all(u % 2 == 0 for u in updates[:-1])  # a checkpoint every 2 updates, and the last
        kept = run["by_community_validation"]
        assert kept["community_validation"] == max(c["community_validation"] for c in run["curve"]
                                                    if c["community_validation"] is not None)
    # Seed 0 trains the demo's own critics: checkpoints and validations more often change nothing.
    assert runs[(1.0, 0)]["final"]["oracle_accuracy"] == pytest.approx(
        demo_critic["accuracy_vs_oracle"]["pairwise_accuracy"], abs=1e-9)
    assert runs[(0.5, 0)]["final"]["oracle_accuracy"] == pytest.approx(
        demo_half["accuracy_vs_oracle"]["pairwise_accuracy"], abs=1e-9)
    assert runs[(0.5, 0)]["n_pairs"] == demo_half["n_pairs"]
    again = run_critic_study(quick_demo, seeds=(0, 1), fractions=(0.5, 1.0), every=2)  # reused, not retrained
    assert again["runs"] == summary["runs"]
    text = critic_study_markdown(summary)
    assert "kept by community validation" in text
    assert (quick_demo / "study" / "critic" / "critic.md").read_text() == text


def test_world_arms_quick_answers_the_question_end_to_end(quick_demo, monkeypatch):
    """social-refl-world-arms --quick on the quick demo: the community's per-image feedback, DPO's and KTO's
    settings by the written rule, each choice and ReFL per seed, one comparison per seed with every arm."""
    import pandas as pd

    from reward.data import LabelShards
    from toyworld.cli import arms_main

    results = json.loads((quick_demo / "results.json").read_text())
    assert arms_main(["--demo", str(quick_demo), "--quick", "--seeds", "0", "1"]) == 0
    summary = json.loads((quick_demo / "arms" / "arms.json").read_text())
    # The feedback: every image of the critic's pairs, liked when preferred, read by the real reader.
    pairs = pd.read_parquet(quick_demo / "community" / "train" / "pairs.parquet")
    labels = LabelShards(quick_demo / "arms" / "feedback" / "labels.parquet", 16)
    fb = summary["feedback"]
    assert fb["n_liked"] == pairs["pos_path"].nunique() and fb["n_not_liked"] == pairs["neg_path"].nunique()
    assert len(labels) == fb["n_images"] == fb["n_liked"] + fb["n_not_liked"]
    assert labels[0]["image"].shape == (3, 16, 16)
    # The rule: the critic held out, never the oracle; a choice per method from the quick grid.
    assert summary["rule"]["maximise"] == f"eval/heldout/critic:{quick_demo / 'critic' / 'critic'}"
    assert not any("oracle" in k for k in summary["rule"]["hold"])
    for method, sweep in summary["sweeps"].items():
        assert sweep["choice"]["setting"] in sweep["grid"] and 0 <= sweep["choice"]["update"] <= 4, method
    # Per seed one comparison with every arm, the base samples the demo's own.
    oracle = next(s for s in results["evaluators"] if s.startswith("oracle"))
    n, m = results["n_samples"], results["n_tuned_samples"]
    for seed in (0, 1):
        compared = json.loads((quick_demo / "arms" / "compare" / f"seed-{seed}" / "results.json").read_text())
        assert compared["models"] == ["base", "refl", "dpo", "kto"]
        assert compared["arms"]["base_random"]["per_prompt"][oracle] == \
            results["arms"]["base_random"]["per_prompt"][oracle]
        arms = summary["per_seed"][str(seed)]["arms"]
        assert list(arms) == ["base_random", f"base_best_of_{n}", "refl_random", "dpo_random", "kto_random",
                              f"refl_best_of_{m}"]
        for arm, row in arms.items():
            assert row["judges"][oracle] == compared["arms"][arm]["scores"][oracle]["mean"]
            if arm != "base_random":
                assert row["oracle_win_rate"] == compared["win_rates"][oracle][f"{arm}_vs_base_random"]
        for method in ("dpo", "kto"):  # the training each run recorded, unless the rule kept the base
            assert (arms[f"{method}_random"]["training"] is None) == (summary["sweeps"][method]["choice"]
                                                                       ["update"] == 0)
    # ReFL's seed 0 is the demo's own run, judged alike
    assert summary["per_seed"]["0"]["arms"]["refl_random"]["judges"][oracle] == \
        results["arms"]["refl_random"]["scores"][oracle]["mean"]
    table = (quick_demo / "arms" / "arms.md").read_text()
    for title in ("| base |", f"| best-of-{n} by the critic |", "| ReFL |", "| DPO |", "| KTO |",
                  f"| ReFL + best-of-{m} by the critic |", "oracle win rate vs base", "oracle term: size"):
        assert title in table, title
    assert "Quick mode" in table
    # The demo's report shows the table when the study is there (read back from arms.json).
    from toyworld.demo.report import arms_section

    assert "| DPO |" in table and "<td>DPO</td>" in arms_section(quick_demo)
    # A rerun trains and draws nothing; the demo's own results are left as they were.
    import preference.train

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished preference run was trained again")

    monkeypatch.setattr(preference.train, "train", must_not_train)
    assert arms_main(["--demo", str(quick_demo), "--quick", "--seeds", "0", "1"]) == 0
    assert json.loads((quick_demo / "arms" / "arms.json").read_text())["per_seed"] == summary["per_seed"]
    assert json.loads((quick_demo / "results.json").read_text()) == results
