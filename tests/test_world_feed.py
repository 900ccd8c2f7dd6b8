"""The third edition's world parts: the community's feed mixes guidance as its config says, the critic's
learning-curve subsets and oracle-gap bins, and the sweep rule that picks ReFL's settings."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_feed_draws_each_image_at_its_configured_guidance(tmp_path):
    from refl.components import load_components
    from toyworld.demo.config import ASSETS, DemoConfig, fitting_scheduler
    from toyworld.demo.stages import _sample
    from toyworld.pretraining import sample_images

    sd = str(ASSETS / "toy-sd")
    components = load_components(sd)
    ddim = fitting_scheduler(DemoConfig(sd_model=sd))  # the UNet's feed sampler, as sample_images draws
    assert ddim == "ddim"
    prompts = ["a red square", "a blue circle on a white background"]
    guidance = [1.0, 6.0, 1.0]
    images = _sample(components, prompts, guidance, 3, 10, tmp_path, sd, ddim)  # (P, n, H, W, 3)
    assert images.shape[:2] == (2, 3)
    for j, g in enumerate(guidance):  # slot j: every prompt at guidance[j], from seed 10 + j * P
        assert np.array_equal(images[:, j], sample_images(components, prompts, 3, g, 10 + j * len(prompts)))
    assert not np.array_equal(images[:, 0], images[:, 2])  # the same scale twice is two draws, not a copy
    # guidance mattered
    assert not np.array_equal(sample_images(components, prompts, 3, 6.0, 10), images[:, 0])
    again = _sample(components, prompts, guidance, 3, 10, tmp_path, sd, ddim)  # from the cache
    assert np.array_equal(again, images) and len(list(tmp_path.glob("samples-*.npz"))) == 1
    _sample(components, prompts, [1.0, 6.0, 2.0], 3, 10, tmp_path, sd, ddim)
    assert len(list(tmp_path.glob("samples-*.npz"))) == 2  # another mix is another key


def test_learning_curve_subsets_are_nested_and_point_at_the_same_images(tmp_path):
    from toyworld.critic_vs_oracle import subset_pairs

    src = tmp_path / "community" / "train"
    (src / "images").mkdir(parents=True)
    rows = [{"prompt": f"p{i}", "pos_path": f"images/{i}a.png",
             "neg_path": f"images/{i}b.png"} for i in range(40)]
    pd.DataFrame(rows).to_parquet(src / "pairs.parquet")
    out = tmp_path / "critic" / "curve"
    parts = {f: pd.read_parquet(subset_pairs(src / "pairs.parquet", f, 0, out / f"pairs-{f}.parquet"))
             for f in (0.125, 0.5, 1.0)}
    assert {f: len(p) for f, p in parts.items()} == {0.125: 5, 0.5: 20, 1.0: 40}
    assert set(parts[0.125].prompt) <= set(parts[0.5].prompt) <= set(parts[1.0].prompt)
    for p in parts.values():  # rewritten relative to the subset's folder, resolving to the source images
        resolved = {(out / q).resolve() for q in p.pos_path}
        assert resolved <= {(src / f"images/{i}a.png").resolve() for i in range(40)}
    assert sorted(os.listdir(src)) == ["images", "pairs.parquet"]  # the stage's input folder untouched
    other = pd.read_parquet(subset_pairs(src / "pairs.parquet", 0.5, 1, out / "seed1.parquet"))
    assert set(other.prompt) != set(parts[0.5].prompt)


def test_accuracy_by_gap_bins_every_pair_once():
    from toyworld.critic_vs_oracle import accuracy_by_gap

    gaps = np.array([0.02, 0.03, 0.05, 0.5, 0.2, 0.07])
    correct = np.array([0.0, 1.0, 1.0, 1.0, 0.5, 0.0])
    bins = accuracy_by_gap(correct, gaps, edges=(0.04, 0.1, float("inf")))
    assert [b["n_pairs"] for b in bins] == [2, 2, 2]
    assert [b["accuracy"] for b in bins] == [0.5, 0.5, 0.75] and bins[-1]["gap_to"] is None  # open, JSON-safe
    empty = accuracy_by_gap(correct, gaps, edges=(0.01, float("inf")))
    assert empty[0] == {"gap_from": 0.0, "gap_to": 0.01, "n_pairs": 0, "accuracy": None}


def _records(curve: dict[str, list[float]]) -> list[dict]:
    """metrics.jsonl records: one validation row per update (0, 10, ...) plus training rows between."""
    n = len(next(iter(curve.values())))
    rows = []
    for i in range(n):
        rows.append({"update": 10 * i, **{k: v[i] for k, v in curve.items()}})
        rows.append({"update": 10 * i + 1, "train/reward": 0.0})
    return rows


CLIP, FID = "eval/heldout/clip:toy", "eval/heldout/fidelity:"


def test_sweep_rule_keeps_the_best_reward_that_holds_the_judges():
    from refl.sweep import SweepRule, choose

    rule = SweepRule(hold={CLIP: 1.0, FID: 0.05})
    runs = {
        # climbs highest, but gives up the CLIP after update 10
        "fast": _records({"eval/reward": [0.0, 0.5, 0.9, 1.2], CLIP: [95.0, 94.5, 93.0, 90.0],
                          FID: [1.0, 1.0, 1.0, 1.0]}),
        # climbs slower and holds both judges until update 20; fidelity goes at 30
        "slow": _records({"eval/reward": [0.0, 0.3, 0.6, 0.8], CLIP: [95.0, 95.0, 94.2, 94.5],
                          FID: [1.0, 0.98, 0.96, 0.9]}),
    }
    chosen = choose(runs, rule)
    assert (chosen["run"], chosen["update"]) == ("slow", 20)
    assert chosen["per_run"]["fast"]["update"] == 10 and chosen["row"]["eval/reward"] == 0.6
    # Ties go to the earlier update.
    flat = {"flat": _records({"eval/reward": [0.0, 0.4, 0.4], CLIP: [95.0] * 3, FID: [1.0] * 3})}
    assert choose(flat, rule)["update"] == 10


def test_sweep_rule_refuses_the_oracle_and_needs_the_base():
    from refl.sweep import SweepRule, choose

    runs = {"a": _records({"eval/reward": [0.0, 1.0], "eval/heldout/oracle:": [0.7, 0.8],
                           CLIP: [95.0, 95.0]})}
    with pytest.raises(ValueError, match="oracle is for evaluation only"):
        choose(runs, SweepRule(hold={"eval/heldout/oracle:": 0.0}))
    with pytest.raises(ValueError, match="oracle is for evaluation only"):
        choose(runs, SweepRule(maximise="eval/heldout/oracle:"))
    late = {"a": [r for r in runs["a"] if r["update"] > 0]}
    with pytest.raises(ValueError, match="validate_at_start"):
        choose(late, SweepRule(hold={CLIP: 1.0}))
    with pytest.raises(KeyError, match="clip:other"):
        choose(runs, SweepRule(hold={"eval/heldout/clip:other": 1.0}))


def test_guard_picks_select_and_stop_on_the_curve():
    from refl.sweep import SweepRule, guard_picks, validations

    rows = validations(_records({"eval/reward": [0.0, 0.2, 0.4, 0.6, 0.8],
                                 CLIP: [95.0, 95.5, 95.2, 94.9, 94.0], FID: [1.0] * 5}))
    picks = guard_picks(rows, {"CLIP": CLIP}, SweepRule(hold={CLIP: 0.5}), drops=2)
    assert picks["select by CLIP"] == 10
    assert picks["stop after 2 drops of CLIP"] == 30  # fell at 20 and 30 while the reward rose
    assert picks["sweep rule"] == 30  # 94.9 is within 0.5 of 95.0; 94.0 is not
