"""train.init_from: the critic trainer and both LoRA trainers start from an earlier run's weights (its folder,
a checkpoint, or its critic/ or lora/), exactly, and a run started so resumes like an uninterrupted one."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from helpers.lora import randomise_lora_b
from helpers.training import PROMPTS, lora_file, tiny_train_overrides
from safetensors.torch import load_file

import reward
from reward.config import RewardConfig
from reward.data import load_pairs
from reward.evaluate import score_pairs
from reward.train import train as train_critic
from runkit.config import load_config

torch.set_num_threads(1)


def _critic_cfg(colour_pairs, out, *extra):
    return load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", "model.training_mode=all",
        f"data.train={colour_pairs['train']}", f"data.val={colour_pairs['val']}",
        "train.lr=2e-3", "train.batch_size=32", "train.log_with=none", f"train.output_dir={out}", *extra])


@pytest.fixture(scope="module")
def earlier_critic(colour_pairs, tmp_path_factory):
    """A trained, calibrated critic run with a checkpoint at update 4."""
    out = tmp_path_factory.mktemp("earlier_critic")
    train_critic(_critic_cfg(colour_pairs, out, "train.max_updates=4", "train.checkpoint_every=4"))
    return out


def test_a_critic_started_from_an_earlier_one_holds_exactly_its_weights(colour_pairs, earlier_critic,
                                                                         tmp_path):
    val = load_pairs(colour_pairs["val"])
    checkpoint = earlier_critic / "checkpoints" / "update-000004"
    # lr 0 and no calibration: the run's critic is where it started. Each way of naming the earlier run (the
    # run folder means its final, calibrated critic; a checkpoint holds the critic before calibration), and
    # bf16 autocast (the trained weights stay fp32).
    starts = {"run folder": (earlier_critic, earlier_critic / "critic", []),
              "checkpoint": (checkpoint, checkpoint / "critic", []),
              "critic folder, bf16": (earlier_critic / "critic", earlier_critic / "critic",
                                      ["train.mixed_precision=bf16"])}
    assert reward.load(earlier_critic / "critic").score_scale.item() != 1.0  # the calibration travels too
    for name, (start, weights, extra) in starts.items():
        AcceleratorState._reset_state(reset_partial_state=True)  # another mixed precision in this process
        earlier = reward.load(weights)
        out = tmp_path / name.replace(" ", "-").replace(",", "")
        result = train_critic(_critic_cfg(colour_pairs, out, f"train.init_from={start}", "train.lr=0",
                                          "train.max_updates=1", "train.calibrate=false", *extra))
        state, want = result["critic"].state_dict(), earlier.state_dict()
        assert state.keys() == want.keys()
        assert all(torch.equal(state[k].cpu(), want[k]) for k in want), name
        scores, expected = score_pairs(reward.load(out / "critic"), val), score_pairs(earlier, val)
        assert all(np.array_equal(a, b) for a, b in zip(scores, expected)), name
    # A fresh critic of the same recipe scores otherwise: the start mattered.
    AcceleratorState._reset_state(reset_partial_state=True)
    fresh = train_critic(_critic_cfg(colour_pairs, tmp_path / "fresh", "train.lr=0", "train.max_updates=1",
                                     "train.calibrate=false"))["critic"]
    assert not np.array_equal(score_pairs(fresh, val)[0], score_pairs(earlier, val)[0])


def test_a_wrong_init_from_is_named_before_the_model_is_built(colour_pairs, earlier_critic, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.init_from=.*nowhere: holds no critic"):
        train_critic(_critic_cfg(colour_pairs, tmp_path / "a", f"train.init_from={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "a").exists()
    # Another architecture's critic is refused naming the folder.
    with pytest.raises(ValueError, match="does not match model 'toy-clip'"):
        train_critic(_critic_cfg(colour_pairs, tmp_path / "b", "model.model_name=toy-clip",
                                 f"train.init_from={earlier_critic}"))


def test_a_critic_run_from_an_earlier_one_resumes_like_an_uninterrupted_one(colour_pairs, earlier_critic,
                                                                             tmp_path):
    # 384 pairs / batch 32 = 12 updates per epoch; the checkpoint at update 8 sits mid-epoch.
    extra = [f"train.init_from={earlier_critic}", "train.max_updates=16", "train.checkpoint_every=8",
             "train.checkpoints_keep=0", "train.validate_every=100", "train.lr_schedule=cosine",
             "train.warmup_updates=3"]
    full = train_critic(_critic_cfg(colour_pairs, tmp_path / "full", *extra))["critic"]
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "update-000008",
                    resumed_dir / "checkpoints" / "update-000008")
    resumed = train_critic(_critic_cfg(colour_pairs, resumed_dir, *extra, "train.resume=latest"))
    assert resumed["update"] == 16
    diff = max((a - b).abs().max().item() for a, b in zip(full.state_dict().values(),
                                                          resumed["critic"].state_dict().values()))
    assert diff < 1e-6, diff
    moved = reward.load(earlier_critic / "critic").state_dict()
    assert any(not torch.equal(v, moved[k]) for k, v in full.state_dict().items() if "score_" not in k)


@pytest.fixture(scope="module")
def earlier_lora(base_dir, tmp_path_factory):
    """A LoRA of the tiny base with non-zero B (a no-op LoRA would prove nothing), saved as a run's lora/."""
    from refl.components import load_components
    from refl.lora import LoraConfig, add_lora, save_lora

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=4, alpha=4.0), seed=3)
    randomise_lora_b(components)
    run = tmp_path_factory.mktemp("earlier_refl")
    save_lora(components, run / "lora")
    return run


def _prepared(base_dir, init_from, **lora):
    from accelerate import Accelerator

    from refl.components import Checkpointing, ModelConfig
    from refl.config import ReflTrainConfig
    from refl.lora import LoraConfig
    from refl.lora_training import prepare_lora_training

    return prepare_lora_training(ModelConfig(name=str(base_dir)), LoraConfig(**lora),
                                 ReflTrainConfig(init_from=str(init_from), seed=5), Checkpointing(),
                                 Accelerator())[0]


def test_refl_started_from_a_lora_draws_what_the_stock_pipeline_draws_with_it(base_dir, earlier_lora):
    from refl.generate import load_pipeline
    from refl.sampling import make_pipeline, sample

    seeds = [11, 12, 13, 14]

    def draw(pipe):
        return sample(pipe, PROMPTS, seeds=seeds, num_inference_steps=4, guidance_scale=3.0)  # (4, H, W, 3)

    stock = draw(load_pipeline(str(base_dir), str(earlier_lora / "lora"), scheduler="ddim"))
    for start in (earlier_lora, earlier_lora / "lora"):  # the run folder or its lora/
        components = _prepared(base_dir, start)
        assert np.array_equal(draw(make_pipeline(components, "ddim")), stock)
    assert not np.array_equal(draw(load_pipeline(str(base_dir), scheduler="ddim")), stock)  # the LoRA matters


def test_a_lora_that_does_not_fit_is_named(base_dir, earlier_lora, tmp_path):
    with pytest.raises(ValueError, match=r"rank 4, alpha 4.0; set lora.rank=4 and lora.alpha=4.0"):
        _prepared(base_dir, earlier_lora, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="does not fit this run's adapters"):
        _prepared(base_dir, earlier_lora, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"])
    with pytest.raises(FileNotFoundError, match="holds no LoRA"):
        _prepared(base_dir, tmp_path)


def test_both_lora_trainers_start_from_the_lora_exactly(base_dir, earlier_lora, tmp_path):
    """lr 0 in bf16: the LoRA a ReFL run and a DPO run save is the one they started from, tensor for tensor
    (through the diffusers key layout and back)."""
    import preference.train as ptrain
    from preference.config import PreferenceConfig
    from refl.config import ReflConfig
    from refl.train import train
    from reward.synthetic import make_colour_pairs

    want = load_file(str(earlier_lora / "lora" / "pytorch_lora_weights.safetensors"))
    common = [f"model.name={base_dir}", f"train.init_from={earlier_lora}", "train.lr=0",
              "train.max_updates=1", "train.mixed_precision=bf16", "lora.dropout=0.0"]
    train(load_config(ReflConfig, None, tiny_train_overrides(tmp_path / "refl", updates=1) + common))
    pairs = make_colour_pairs(tmp_path / "colour", n_pairs=4, size=16, seed=0)
    ptrain.train(load_config(PreferenceConfig, None, [
        f"train.output_dir={tmp_path / 'dpo'}", f"data.train={pairs}", "train.batch_size=2",
        "train.validation_prompts=[]", "train.log_with=none", *common]))
    for run in ("refl", "dpo"):
        got = load_file(str(tmp_path / run / "lora" / "pytorch_lora_weights.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), run


def test_refl_from_a_lora_resumes_like_an_uninterrupted_run(base_dir, earlier_lora, tmp_path):
    from refl.config import ReflConfig
    from refl.train import train

    def overrides(out):
        return tiny_train_overrides(out) + [f"model.name={base_dir}", f"train.init_from={earlier_lora}"]

    train(load_config(ReflConfig, None, overrides(tmp_path / "full")))
    calls = {"n": 0}

    def crashing_contrast(images, prompts):
        calls["n"] += 1
        if calls["n"] > 5:  # dies in update 3, after the update-2 checkpoint (2 micro-batches per update)
            raise KeyboardInterrupt("simulated crash")
        w = images.shape[-1] // 2
        return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10

    with pytest.raises(KeyboardInterrupt):
        train(load_config(ReflConfig, None, overrides(tmp_path / "resumed")), reward_fn=crashing_contrast)
    train(load_config(ReflConfig, None, overrides(tmp_path / "resumed") + ["train.resume=latest"]))
    a = lora_file(tmp_path / "full" / "checkpoints" / "update-000004")
    b = lora_file(tmp_path / "resumed" / "checkpoints" / "update-000004")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # It trained from the earlier LoRA: B started at its values, not at zero, and moved from there.
    start = {k.replace("unet.", "", 1).replace(".lora.up.", ".lora_B."): v
             for k, v in load_file(str(earlier_lora / "lora" / "pytorch_lora_weights.safetensors")).items()
             if ".lora.up." in k}
    b_now = {k.removeprefix("unet."): v for k, v in a.items() if "lora_B" in k}
    assert start.keys() == b_now.keys()
    gaps = [(b_now[k] - start[k]).abs().max().item() for k in start]
    assert max(gaps) > 1e-4 and max(gaps) < start[next(iter(start))].abs().max().item()
