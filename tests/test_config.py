import pytest

from reward.train import RewardExperiment
from runkit.config import ConfigError, load_config, save_config


def test_yaml_and_overrides_apply_in_order(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  batch_size: 8\ncritic:\n  model_name: tiny-clip\n")
    cfg = load_config(RewardExperiment, f, ["train.lr=5e-5", "loss.name=pairwise", "data.check_images=false"])
    assert cfg.train.lr == pytest.approx(5e-5)
    assert cfg.train.batch_size == 8
    assert cfg.critic.model_name == "tiny-clip"
    assert cfg.loss.name == "pairwise"
    assert cfg.data.check_images is False


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"train\.lrr") as err:
        load_config(RewardExperiment, f)
    assert str(f) in str(err.value)
    with pytest.raises(ConfigError, match=r"critic\.nope"):
        load_config(RewardExperiment, None, ["critic.nope=1"])


def test_wrong_type_and_bad_choice_are_refused():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(RewardExperiment, None, ["train.batch_size=lots"])
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(RewardExperiment, None, ["loss.name=hinge"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(RewardExperiment, None, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RewardExperiment, None, ["train.epochs=3", "output_dir=somewhere"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(RewardExperiment, path)
    assert again == cfg


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("reward_*.yaml"))
    assert files, "no reward configs shipped"
    for f in files:
        load_config(RewardExperiment, f)
