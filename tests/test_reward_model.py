import numpy as np
import pytest
import torch
from PIL import Image

import reward
from reward.model import CriticConfig, create_critic
from reward.modes import TRAINING_MODES, trainable_parameter_names


@pytest.fixture(scope="module")
def critic():
    torch.manual_seed(0)
    return create_critic(CriticConfig(model_name="tiny-clip", training_mode="all"))


def _blocks(names, prefix):
    return sorted({int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)})


def test_training_modes_select_exactly_the_paper_slices():
    # tiny-clip: 3 vision blocks, 3 text blocks -> counts are capped at the tower depth.
    model = create_critic(CriticConfig(model_name="tiny-clip", training_mode="all")).clip
    every = {n for n, _ in model.named_parameters()}
    v, t = "visual.transformer.resblocks.", "transformer.resblocks."
    expect = {
        "all": every - {"logit_scale"},
        "visual": {n for n in every if n.startswith("visual.")},
        "visual_upper_layers": {n for n in every if n.startswith(v) or n.startswith("visual.ln_post.")},
        "visual_last_layer": {n for n in every if n.startswith(v + "2.") or n.startswith("visual.ln_post.")},
    }
    for mode, names in expect.items():
        assert trainable_parameter_names(model, mode) == names, mode
    paper = trainable_parameter_names(model, "visual_upper_layers_textual_upper_layers")
    assert _blocks(paper, v) == [0, 1, 2] and _blocks(paper, t) == [1, 2]
    assert {"ln_final.weight", "text_projection", "visual.ln_post.weight"} <= paper
    assert "visual.proj" not in paper and "token_embedding.weight" not in paper
    deeper = trainable_parameter_names(model, "visual_upper_layers_textual_upper_layers_deeper")
    assert _blocks(deeper, t) == [0, 1, 2]


def test_frozen_parameters_hold_no_gradient():
    critic = create_critic(CriticConfig(model_name="tiny-clip", training_mode="visual_last_layer"))
    images = torch.rand(2, 3, 16, 16)
    critic(images, ["a red circle", "a blue square"]).sum().backward()
    trained = trainable_parameter_names(critic.clip, "visual_last_layer")
    for name, p in critic.clip.named_parameters():
        if name in trained:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown training_mode 'upper'"):
        create_critic(CriticConfig(model_name="tiny-clip", training_mode="upper"))


def test_gradient_reaches_the_pixels(critic):
    images = torch.rand(3, 3, 40, 56, requires_grad=True)  # not the critic's size: resize + crop in torch
    scores = critic(images, ["a red circle"] * 3)
    assert scores.shape == (3,)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.isfinite(images.grad).all()


def test_pil_and_tensor_paths_agree(critic, tmp_path):
    arr = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    from_file = critic.score("a red circle", str(tmp_path / "x.png"))
    from_tensor = critic(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255, ["a red circle"])
    assert from_file == pytest.approx(from_tensor.item(), abs=1e-5)


def test_inference_rank_is_one_based_and_consistent(critic):
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)) for _ in range(5)]
    ranks, scores = critic.inference_rank("a green triangle", images)
    assert sorted(ranks) == [1, 2, 3, 4, 5]
    assert ranks[int(np.argmax(scores))] == 1 and ranks[int(np.argmin(scores))] == 5
    assert critic.score("a green triangle", images) == pytest.approx(scores)


def test_score_rejects_empty_prompt_and_bad_shape(critic):
    with pytest.raises(ValueError, match="prompt is empty"):
        critic.score("  ", Image.new("RGB", (16, 16)))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        critic(torch.rand(3, 16, 16), ["x"])


def test_calibration_and_save_load_round_trip(critic, tmp_path):
    critic.calibrate_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    images = torch.rand(4, 3, 16, 16)
    prompts = ["a red circle", "a blue square", "two cats", "a tree"]
    with torch.no_grad():
        before = critic(images, prompts)
    critic.save_pretrained(tmp_path / "ck")
    again = reward.load(tmp_path / "ck")
    with torch.no_grad():
        after = again(images, prompts)
    assert torch.allclose(before, after, atol=1e-6)
    assert again.score_scale.item() == pytest.approx(1 / torch.tensor([0.1, 0.2, 0.3, 0.4]).std().item(), rel=1e-5)
    assert not (tmp_path / "ck" / "critic.safetensors.tmp").exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a critic checkpoint"):
        reward.load(tmp_path)
    with pytest.raises(ValueError, match="unknown critic model 'ViT-Q-99'"):
        reward.load("ViT-Q-99")


@pytest.mark.slow
def test_paper_critic_architecture_builds_with_random_weights():
    """configs/reward_social_vitl14.yaml's model, without its weights: the exact ViT-L/14 slices."""
    from reward.config import load_config
    from reward.train import RewardExperiment

    cfg = load_config(RewardExperiment, "configs/reward_social_vitl14.yaml", ["critic.pretrained=null"])
    critic = create_critic(cfg.critic)
    names = {n for n, p in critic.clip.named_parameters() if p.requires_grad}
    assert _blocks(names, "visual.transformer.resblocks.") == [21, 22, 23]
    assert _blocks(names, "transformer.resblocks.") == [10, 11]
    assert critic.image_size == 224
    deeper = trainable_parameter_names(critic.clip, "visual_upper_layers_textual_upper_layers_deeper")
    assert _blocks(deeper, "visual.transformer.resblocks.") == [20, 21, 22, 23]
    assert _blocks(deeper, "transformer.resblocks.") == [9, 10, 11]
    with torch.no_grad():
        assert critic(torch.rand(1, 3, 256, 256), ["a photo"]).shape == (1,)
    assert set(TRAINING_MODES) == {
        "all", "visual", "visual_upper_layers", "visual_upper_layers_textual_upper_layers",
        "visual_upper_layers_textual_upper_layers_deeper", "visual_last_layer"}
