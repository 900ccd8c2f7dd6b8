"""The flywheel on the quick demo: two short rounds end to end (a mixed feed from the previous round's model,
the community's pairs over it, the critic and ReFL each continued from the last round, the rule's choice, the
numbers across rounds), and the loop's pieces on their own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(1)


def test_quick_flywheel_runs_two_rounds_each_from_the_last(quick_demo):
    from refl.config import ReflConfig
    from reward.config import RewardConfig
    from runkit.checkpoints import checkpoint_name
    from runkit.config import load_config
    from runkit.files import content_hash
    from toyworld.cli import flywheel_main
    from toyworld.flywheel import QUICK
    from toyworld.flywheel_report import JUDGES
    from toyworld.variants import slug

    assert flywheel_main(["--demo", str(quick_demo), "--quick"]) == 0
    root = quick_demo / "flywheel"
    seed_dir = root / "seed-0"
    r1, r2 = seed_dir / "round-1", seed_dir / "round-2"
    # The feed: half of each prompt's images from the base, half from round 0's LoRA (the demo's), fresh
    # prompts that the demo's community never saw.
    base, model = (pd.read_parquet(r1 / "feed" / part / "feed.parquet") for part in ("base", "model"))
    assert set(base["lora"]) == {""} and set(model["lora"]) == {str(quick_demo / "refl" / "lora")}
    assert len(base) == len(model) == QUICK["n_prompts"] * 3 and set(base["prompt"]) == set(model["prompt"])
    demo_prompts = set(pd.read_parquet(quick_demo / "community" / "train" / "pairs.parquet")["prompt"])
    assert not set(base["prompt"]) & demo_prompts
    round2_prompts = set(pd.read_parquet(r2 / "feed" / "base" / "feed.parquet")["prompt"])
    assert not round2_prompts & set(base["prompt"])
    assert set(pd.read_parquet(r2 / "feed" / "model" / "feed.parquet")["lora"]) == {str(r1 / "lora")}
    # The community's pairs name the feed's own image files, across the two models too.
    feed_images = {str((r1 / "feed" / part / name).resolve()) for part, frame in (("base", base),
                                                                                    ("model", model))
                   for name in frame["image"]}
    pairs = pd.read_parquet(r1 / "feedback" / "pairs.parquet")
    assert len(pairs) > 0 and {str((r1 / "feedback" / p).resolve()) for p in pairs["pos_path"]} <= feed_images
    # Each critic starts from the last one, on every round's pairs so far.
    assert load_config(RewardConfig, r1 / "critic" / "config.yaml").train.init_from == str(
        quick_demo / "critic" / "critic")
    second = load_config(RewardConfig, r2 / "critic" / "config.yaml")
    assert second.train.init_from == str(r1 / "critic" / "critic")
    assert sorted(p.name for p in (r2 / "critic_data").iterdir()) == [f"round-{k}.parquet" for k in range(3)]
    # ReFL continues from the last round's LoRA; the round keeps the LoRA of the update the rule chose.
    rounds = [json.loads((seed_dir / f"round-{r}" / "round.json").read_text()) for r in range(3)]
    setting = QUICK["refl_settings"][0].split(":")[0]
    for r, prev_lora in ((1, quick_demo / "refl" / "lora"), (2, r1 / "lora")):
        run = seed_dir / f"round-{r}" / "refl" / slug(setting)
        assert load_config(ReflConfig, run / "config.yaml").train.init_from == str(prev_lora)
        update = rounds[r]["chosen"]["update"]
        kept = run / "checkpoints" / checkpoint_name(update) / "lora" if update else prev_lora
        assert content_hash(seed_dir / f"round-{r}" / "lora") == content_hash(kept)
        assert rounds[r]["chosen"]["setting"] == setting
    # The numbers: every judge with its interval, the critic against the oracle where each model draws.
    summary = json.loads((root / "flywheel.json").read_text())
    rows = summary["per_seed"]["0"]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert set(row["judges"]) == set(JUDGES)
        d = row["judges"]["oracle"]["refl_minus_base"]
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        assert set(row["critic_vs_oracle"]["critic"]) == ({"base", "tuned"} if row["round"] == 0
                                                          else {"base", "start", "tuned"})
    # Round r's feed model is round r-1's tuned model: the critic is measured on the same held-out pairs.
    assert rounds[1]["heldout_start"] == rounds[0]["heldout_tuned"]
    assert (rows[1]["critic_vs_oracle"]["previous_critic"]["start"]
            == rows[0]["critic_vs_oracle"]["critic"]["tuned"])
    # The gain over the previous round is paired per prompt on the same comparison seeds.
    gain = np.asarray(rounds[2]["tuned_per_prompt"]) - np.asarray(rounds[1]["tuned_per_prompt"])
    assert rows[2]["gain_over_previous_round"]["mean"] == pytest.approx(gain.mean())
    assert rounds[1]["feedback"]["n_cross_model_pairs"] > 0
    table = (root / "flywheel.md").read_text()
    assert "| 2 |" in table and "### Seed 0" in table and (root / "flywheel.png").is_file()
    # A rerun reuses every round, round 0's measurements too: nothing inside them is written again.
    rounds_dirs = (seed_dir / "round-0", r1, r2)
    stamps = {p: p.stat().st_mtime_ns for d in rounds_dirs for p in d.rglob("*") if p.is_file()}
    assert flywheel_main(["--demo", str(quick_demo), "--quick"]) == 0
    assert {p: p.stat().st_mtime_ns for d in rounds_dirs for p in d.rglob("*") if p.is_file()} == stamps


def test_the_flywheel_refuses_bad_settings_before_any_round(quick_demo, tmp_path, capsys):
    from toyworld.cli import flywheel_main

    assert flywheel_main(["--demo", str(tmp_path)]) == 2
    assert "is not a finished demo" in capsys.readouterr().err
    for override, message in (("base_share=1.5", "base_share must be in [0, 1]"),
                              ("refl_start=scratch", "refl_start='scratch'"),
                              ("critic_start=scratch", "critic_start='scratch'"),
                              ('refl_settings=["typo: refl.train.lrr=1"]', "refl.train.lrr")):
        assert flywheel_main(["--demo", str(quick_demo), "--quick", "--set", override,
                              "--seeds", "7"]) == 2, override
        assert message in capsys.readouterr().err
    assert not (quick_demo / "flywheel" / "seed-7").exists()


def test_rounds_draw_fresh_prompts_and_split_each_prompts_slots():
    from runkit.config import ConfigError
    from toyworld.demo.config import DemoConfig
    from toyworld.flywheel import _split_slots, round_prompts
    from toyworld.variants import FinishedDemo

    demo = FinishedDemo(Path("unused"), DemoConfig())
    rounds = round_prompts(demo, 4, 0)
    assert [len(r) for r in rounds] == [240] * 5
    shown = [set(r) for r in rounds]
    assert all(not (shown[a] & shown[b]) for a in range(5) for b in range(a + 1, 5))
    with pytest.raises(ConfigError, match="fresh training prompts"):
        round_prompts(demo, 5, 0)
    guidance = [1.5, 2.0, 3.0, 4.0, 6.0, 1.5, 2.0, 4.0]
    assert _split_slots(guidance, 0.5) == ([0, 2, 4, 6], [1, 3, 5, 7])
    assert _split_slots(guidance, 0.0) == ([], list(range(8)))
    assert _split_slots(guidance, 1.0) == (list(range(8)), [])


def test_a_fresh_round_that_keeps_its_start_keeps_the_base_exactly(tmp_path):
    """refl_start=base with the rule at update 0: the round's LoRA is one of zeros, which draws the base."""
    from refl.generate import load_pipeline
    from refl.sampling import sample
    from toyworld.demo.config import DemoConfig
    from toyworld.flywheel import _keep_lora

    class Loop:  # what _keep_lora reads of the loop: the rounds' demo config
        dcfg = DemoConfig()

    _keep_lora(Loop(), tmp_path / "run", 0, "", tmp_path / "lora")
    sd = DemoConfig().sd_model

    def draw(pipe):
        return sample(pipe, ["a red square"], seeds=[3], num_inference_steps=2, guidance_scale=4.0)

    assert np.array_equal(draw(load_pipeline(sd, str(tmp_path / "lora"), scheduler="ddim")),
                          draw(load_pipeline(sd, scheduler="ddim")))


def test_critic_start_is_keyed_only_when_set_so_earlier_rounds_stay_reusable():
    from toyworld.flywheel import FlywheelConfig, round_settings

    default = round_settings(FlywheelConfig())
    # the key of the rounds run before critic_start existed
    assert "critic_start" not in default and {"base_share", "refl_start", "hold_reference"} <= set(default)
    assert round_settings(FlywheelConfig(critic_start="base"))["critic_start"] == "base"
