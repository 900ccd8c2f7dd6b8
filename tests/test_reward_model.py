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
    assert again.score_scale.item() == pytest.approx(1 / torch.tensor([0.1, 0.2, 0.3, 0.4]).std().item(),
                                                     rel=1e-5)
    assert not (tmp_path / "ck" / "critic.safetensors.tmp").exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a critic checkpoint"):
        reward.load(tmp_path)
    with pytest.raises(ValueError, match="unknown critic model 'ViT-Q-99'"):
        reward.load("ViT-Q-99")


@pytest.mark.slow
def test_paper_critic_architecture_builds_with_random_weights():
    """configs/reward_social_vitl14.yaml's model, without its weights: the exact ViT-L/14 slices."""
    from reward.config import RewardConfig
    from runkit.config import load_config

    cfg = load_config(RewardConfig, "configs/reward_social_vitl14.yaml", ["model.pretrained=null"])
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


def test_one_preprocessing_whatever_the_size_and_aspect(critic, tmp_path):
    """Scoring a file, the differentiable tensor path and the training data path see the same pixels."""
    import pandas as pd

    from reward.data import PairShards
    from reward.model import load_image_tensor, resize_center_crop

    rng = np.random.default_rng(3)
    arrs = [(rng.random((23, 40, 3)) * 255).astype(np.uint8),
            (rng.random((61, 29, 3)) * 255).astype(np.uint8)]
    for i, arr in enumerate(arrs):  # landscape and portrait, neither at the critic's 16 px
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    native = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in arrs]  # (1, 3, H, W) each
    pd.DataFrame({"prompt": ["a red circle"], "pos_path": ["0.png"], "neg_path": ["1.png"]}).to_parquet(
        tmp_path / "pairs.parquet")
    item = PairShards(tmp_path / "pairs.parquet", critic.image_size)[0]
    for i in range(2):
        from_file = critic.score("a red circle", str(tmp_path / f"{i}.png"))
        with torch.no_grad():
            from_tensor = critic(native[i], ["a red circle"]).item()
            from_data = critic(item["pos" if i == 0 else "neg"][None], ["a red circle"]).item()
        assert from_file == pytest.approx(from_tensor, abs=1e-6)
        assert from_data == pytest.approx(from_tensor, abs=1e-6)
        assert torch.equal(load_image_tensor(str(tmp_path / f"{i}.png"), 16),
                           resize_center_crop(native[i], 16)[0])


def test_bf16_critic_scores_like_fp32(tmp_path):
    torch.manual_seed(0)
    fp32 = create_critic(CriticConfig(model_name="tiny-clip", training_mode="all"))
    fp32.calibrate_(torch.tensor([0.1, 0.3, 0.2, 0.5]))
    fp32.save_pretrained(tmp_path / "ck")
    bf16 = reward.load(tmp_path / "ck").to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.score_scale.dtype == torch.bfloat16
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)) for _ in range(8)]
    a, b = np.array(fp32.score("a red circle", images)), np.array(bf16.score("a red circle", images))
    # bf16 keeps 8 bits of mantissa: cosines agree to ~1e-2; calibrated scores (x 1/std) to ~1e-1.
    assert np.abs(a - b).max() < 0.15 * np.abs(a).max(), (a, b)
    assert np.corrcoef(a, b)[0, 1] > 0.95


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    critic = create_critic(CriticConfig(model_name="tiny-clip"))  # the paper's mode: upper layers train
    images, prompts = torch.rand(2, 3, 20, 16), ["a red circle", "a blue square"]

    def grads():
        critic.zero_grad(set_to_none=True)
        saved = []

        def pack(t):  # every activation the forward keeps for the backward pass
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scores = critic(images, prompts)
        scores.sum().backward()
        return {n: p.grad.clone() for n, p in critic.named_parameters() if p.requires_grad}, sum(saved)

    plain, plain_bytes = grads()
    assert critic.set_grad_checkpointing(True) is critic
    ckpt, ckpt_bytes = grads()
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)  # the blocks' activations are not kept
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name
    critic.set_grad_checkpointing(False)
    assert grads()[1] == plain_bytes


def test_training_forward_runs_in_bf16_under_accelerate():
    from accelerate import Accelerator

    from reward.losses import create_loss
    from reward.train import CriticWithLoss

    torch.manual_seed(0)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    critic = create_critic(CriticConfig(model_name="tiny-clip"))
    module = accelerator.prepare(CriticWithLoss(critic, create_loss("triplet")))
    dtypes = []
    critic.clip.visual.transformer.resblocks[-1].mlp.register_forward_hook(lambda m, i,
                                                                           o: dtypes.append(o.dtype))
    terms = module(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), ["a cat", "a dog"], None, None)
    accelerator.backward(terms["loss"])
    assert dtypes == [torch.bfloat16]  # the towers computed in bf16...
    assert torch.isfinite(terms["loss"])
    trained = [p for p in critic.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)  # ...while weights and grads stay float32
    assert sum(p.grad.abs().sum().item() for p in trained if p.grad is not None) > 0


def test_openai_weights_get_the_quick_gelu_they_were_trained_with(monkeypatch):
    """open_clip 3 builds ViT-L-14 with GELU even for its `openai` tag; the critic follows the tag."""
    import open_clip

    from reward.model import create_critic, uses_quick_gelu

    assert uses_quick_gelu("ViT-L-14", "openai") and uses_quick_gelu("ViT-B-32", "openai")
    assert not uses_quick_gelu("ViT-L-14", "laion2b_s32b_b82k") and not uses_quick_gelu("ViT-L-14", None)
    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):  # stands in for the download
        seen.update(name=name, pretrained=pretrained, **kwargs)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(ValueError, match="could not get open_clip weights ViT-L-14:openai"):  # a user error
        create_critic(model_name="ViT-L-14", pretrained="openai")
    assert seen == {"name": "ViT-L-14", "pretrained": "openai", "force_quick_gelu": True}
