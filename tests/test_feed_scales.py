"""The flow world's feed scales (toyworld/feed_scales.py): the mapping rule and the spread it reads."""

import numpy as np
import pytest

from toyworld.feed_scales import FeedScalesConfig, match_scales, within_prompt_spread


def _profile(fidelity: dict, spread: dict) -> dict:
    return {f"{g:g}": {"prompt_fidelity": fidelity[g], "spread": spread[g]} for g in fidelity}


def test_each_scale_maps_to_the_nearest_spread_among_faithful_enough_candidates():
    reference = _profile({1.5: 0.74, 2.0: 0.80, 4.0: 0.85}, {1.5: 0.030, 2.0: 0.025, 4.0: 0.015})
    target = _profile({1.0: 0.60, 1.5: 0.72, 2.0: 0.78, 4.0: 0.80},
                      {1.0: 0.031, 1.5: 0.026, 2.0: 0.020, 4.0: 0.015})
    # 1.0 would match 1.5's spread best but loses 14 points of fidelity (more than the 5 allowed)
    assert match_scales(reference, target, [1.5, 2.0, 4.0, 1.5], 0.05) == [1.5, 1.5, 4.0, 1.5]
    assert match_scales(reference, target, [1.5, 2.0, 4.0, 1.5], 0.20) == [1.0, 1.5, 4.0, 1.0]


def test_a_tie_goes_to_the_larger_scale_and_no_faithful_candidate_is_refused():
    reference = _profile({2.0: 0.8}, {2.0: 0.5})
    target = _profile({1.0: 0.8, 3.0: 0.8}, {1.0: 0.75, 3.0: 0.25})  # both 0.25 away
    assert match_scales(reference, target, [2.0], 0.05) == [3.0]
    with pytest.raises(ValueError, match="no candidate"):
        match_scales(reference, _profile({1.0: 0.5}, {1.0: 0.02}), [2.0], 0.05)


def test_spread_is_the_per_pixel_std_over_a_prompts_images():
    same = np.full((2, 4, 8, 8, 3), 100, np.uint8)  # (P, S, H, W, 3)
    assert within_prompt_spread(same) == 0.0
    halves = same.copy()
    halves[:, :2] = 0
    halves[:, 2:] = 255  # half black, half white: std 0.5 at every pixel
    assert within_prompt_spread(halves) == pytest.approx(0.5)


def test_feed_scales_must_be_candidates():
    with pytest.raises(ValueError, match="reference_feed"):
        FeedScalesConfig(reference_feed=[1.5, 5.0])


def test_each_shipped_world_model_gets_its_own_feed_unless_one_is_set(tmp_path):
    from runkit.config import load_config
    from toyworld.demo.config import FEED_GUIDANCE, FLOW_FEED_GUIDANCE, DemoConfig, feed_guidance_scales
    from toyworld.world import ASSETS

    # As the command line builds it: the defaults first, then --set sd_model
    assert feed_guidance_scales(load_config(DemoConfig)) == FEED_GUIDANCE  # the UNet world's as it was
    flow = load_config(DemoConfig, None, ["sd_model=toy-flow"])
    assert feed_guidance_scales(flow) == FLOW_FEED_GUIDANCE
    assert feed_guidance_scales(load_config(DemoConfig, None, [f"sd_model={ASSETS / 'toy-flow'}"])) \
        == FLOW_FEED_GUIDANCE
    assert feed_guidance_scales(load_config(DemoConfig, None, [f"sd_model={tmp_path}"])) == FEED_GUIDANCE
    chosen = load_config(DemoConfig, None, ["sd_model=toy-flow", "community.feed_guidance_scales=[2.0, 4.0]"])
    assert feed_guidance_scales(chosen) == [2.0, 4.0]


def test_a_missing_model_or_unwritable_output_is_refused_before_sampling(tmp_path, monkeypatch):
    import toyworld.feed_scales as feed_scales

    monkeypatch.setattr(feed_scales, "scale_profile", lambda *a, **k: pytest.fail("sampled before checking"))
    taken = tmp_path / "out"
    taken.write_text("a file where the output folder would go")
    with pytest.raises(NotADirectoryError, match="output_dir"):
        feed_scales.run_feed_scales(FeedScalesConfig(output_dir=str(taken)))
    with pytest.raises(FileNotFoundError, match=r"^model .*missing is not a diffusers model folder"):
        feed_scales.run_feed_scales(FeedScalesConfig(model=str(tmp_path / "missing"),
                                                     output_dir=str(tmp_path / "run")))
