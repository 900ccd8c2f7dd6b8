"""The studies on a finished demo run on a flow demo as on the UNet one: each builds its ReFL, comparison,
DPO / KTO and feed samplers from the demo config's fitting_scheduler, so a demo folder whose base model is
the toy flow model trains and samples with the flow Euler sampler everywhere. Checked without training:
the trainers and the comparison are replaced by recorders that stop the study there, so what is checked is
the config each study hands them. The short names `sd_model: toy-sd | toy-flow` resolve to toyworld/assets.
"""

from __future__ import annotations

import shutil

import pytest

from runkit.config import ConfigError
from toyworld.demo.config import ASSETS, DemoConfig, fitting_scheduler

FLOW = "flow_euler"


class Stopped(Exception):
    """Raised by the recorders where the study would start sampling."""


@pytest.fixture
def flow_demo(tmp_path, toy_flow_dir):
    """A demo folder on the toy flow model as the studies open it (demo_config.yaml, the critic,
    summary.json), without its stages' outputs: every study starts from its config and the critic."""
    from runkit.config import save_config

    folder = tmp_path / "demo-flow"
    folder.mkdir()
    save_config(DemoConfig(output_dir=str(folder), sd_model=str(toy_flow_dir)), folder / "demo_config.yaml")
    shutil.copytree(ASSETS / "toy-clip", folder / "critic" / "critic")  # a real critic folder
    (folder / "summary.json").write_text("{}")
    return folder


@pytest.fixture
def recorded(monkeypatch):
    """The configs handed to ReFL's and DPO / KTO's trainers and to the comparison. ReFL's trainer returns
    at once (a finished stage with nothing in it), so a study goes on to its comparison; the comparison and
    the preference trainer stop the study."""
    import evaluation.harness
    import preference.train
    import refl.train

    seen = {"refl": [], "compare": [], "preference": []}

    def refl_train(cfg):
        seen["refl"].append(cfg)
        return {}

    def stop(kind):
        def record(cfg, **_):
            seen[kind].append(cfg)
            raise Stopped(kind)
        return record

    monkeypatch.setattr(refl.train, "train", refl_train)
    monkeypatch.setattr(evaluation.harness, "run_compare", stop("compare"))
    monkeypatch.setattr(preference.train, "train", stop("preference"))
    return seen


def _on_flow(cfgs, toy_flow_dir, scheduler=lambda c: c.step.scheduler):
    assert cfgs, "the study handed nothing to the trainer"
    for cfg in cfgs:
        assert cfg.model.name == str(toy_flow_dir)
        assert scheduler(cfg) == FLOW


def test_sweep_trains_every_setting_with_the_flow_sampler(flow_demo, recorded, toy_flow_dir):
    from toyworld.sweep import GRID, run_sweep

    with pytest.raises(ValueError, match="update 0"):  # the recorder trained nothing: no validation to choose
        run_sweep(flow_demo)
    _on_flow(recorded["refl"], toy_flow_dir)
    assert len(recorded["refl"]) == len(GRID)
    # ReFL's validation (the sweep rule's curves, the over-optimisation chart) samples with the same sampler.
    assert {c.train.validate_at_start for c in recorded["refl"]} == {True}


@pytest.mark.parametrize("study", ["world study", "ablation"])
def test_seed_study_and_ablation_train_and_compare_with_the_flow_sampler(study, flow_demo, recorded,
                                                                         toy_flow_dir):
    from toyworld.ablation import run_ablation
    from toyworld.study import run_study

    with pytest.raises(Stopped, match="compare"):
        run_study(flow_demo, seeds=[1]) if study == "world study" else run_ablation(flow_demo)
    _on_flow(recorded["refl"], toy_flow_dir)
    _on_flow(recorded["compare"], toy_flow_dir, scheduler=lambda c: c.scheduler)


def test_arms_tune_and_compare_with_the_flow_sampler(flow_demo, recorded, toy_flow_dir, tmp_path):
    from toyworld.arms import METHODS, compare_seed, preference_config, refl_run, stage_preference
    from toyworld.variants import open_demo

    demo = open_demo(flow_demo)
    for method in METHODS:
        cfg = preference_config(demo, method, tmp_path / "feedback.parquet", tmp_path / method, [], 2)
        with pytest.raises(Stopped, match="preference"):
            stage_preference(cfg, tmp_path / method, {"sd_model": demo.cfg.sd_model})
    _on_flow(recorded["preference"], toy_flow_dir, scheduler=lambda c: c.scheduler)
    refl = refl_run(demo, 1)  # the world study's seed-1 run, which the arms share
    _on_flow(recorded["refl"], toy_flow_dir)
    with pytest.raises(Stopped, match="compare"):
        compare_seed(demo, tmp_path / "compare", {"refl": refl["lora"], "dpo": "d", "kto": "k"}, False)
    _on_flow(recorded["compare"], toy_flow_dir, scheduler=lambda c: c.scheduler)
    # On the UNet demo the same runs keep ReFL's DDIM: their stage keys are unchanged.
    assert fitting_scheduler(DemoConfig(), DemoConfig().refl.step.scheduler) == "ddim"


def test_flywheel_feed_draws_with_the_flow_sampler(toy_flow_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from toyworld.flywheel import _pipeline

    pipe = _pipeline(DemoConfig(sd_model=str(toy_flow_dir)), None)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # The demo's own feed is drawn by the same function's answer: the family's sampler, DDIM on the UNet.
    assert fitting_scheduler(DemoConfig(sd_model=str(toy_flow_dir))) == FLOW
    assert fitting_scheduler(DemoConfig()) == "ddim"


def test_short_names_name_the_shipped_folders(tmp_path, monkeypatch, toy_flow_dir, capsys):
    import toyworld.demo.config as config
    from toyworld.cli import demo_main

    # The default is the shipped toy SD's folder, spelled as before (the stages' keys name it).
    assert DemoConfig().sd_model == str(ASSETS / "toy-sd") == DemoConfig(sd_model="toy-sd").sd_model
    assert DemoConfig(sd_model=str(toy_flow_dir)).sd_model == str(toy_flow_dir)  # a folder is itself
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "toy-sd").symlink_to(ASSETS / "toy-sd")
    monkeypatch.setattr(config, "ASSETS", assets)
    # Not made yet: one line naming the command that makes it, before any work.
    with pytest.raises(ConfigError, match=f"social-refl-pretrain-toy-flow --out {assets / 'toy-flow'}"):
        DemoConfig(sd_model="toy-flow")
    out = tmp_path / "demo"
    assert demo_main(["--out", str(out), "--set", "sd_model=toy-flow"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "social-refl-pretrain-toy-flow --out" in err and not out.exists()
    (assets / "toy-flow").symlink_to(toy_flow_dir)
    cfg = DemoConfig(sd_model="toy-flow")
    assert cfg.sd_model == str(assets / "toy-flow")
    assert fitting_scheduler(cfg, cfg.refl.step.scheduler) == FLOW
