"""refl.components: the presets (same factory as real runs), their offline CLIP tokenizer, saved pipelines
that stock diffusers loads, the attention choice and a full-size architecture taking LoRA."""

from __future__ import annotations

import pytest
import torch

from refl.components import PRESETS, build_clip_tokenizer, load_components
from refl.lora import LoraConfig, add_lora

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting (100x slower).
torch.set_num_threads(1)


def test_tokenizer_ids_equal_open_clip():
    import open_clip

    ours = build_clip_tokenizer(77)
    theirs = open_clip.get_tokenizer("ViT-B-32")
    assert len(ours) == 49408
    for prompt in ["a red square on a blue background", "Hello, World! It's 3:45pm...", "héllo café naïve",
                   "a photo of an astronaut riding a horse on mars", "   spaced    out\ttext  ",
                   "UPPER lower 123"]:
        ref = theirs([prompt])[0].tolist()
        ref = ref[: ref.index(49407) + 1]  # open_clip pads with 0 after <|endoftext|>
        assert ours(prompt).input_ids == ref, prompt


def test_presets_build_with_design_shapes():
    toy = load_components("toy")
    spec = PRESETS["toy"]
    assert toy.image_size == 32 and toy.unet.config.sample_size == 8
    assert tuple(toy.vae.config.block_out_channels) == (32, 32, 64) and toy.vae.config.latent_channels == 4
    assert (tuple(toy.unet.config.block_out_channels) == (64, 128)
            and toy.unet.config.cross_attention_dim == 64)
    assert toy.text_encoder.config.hidden_size == 64 and toy.text_encoder.config.num_hidden_layers == 2
    assert (toy.text_encoder.config.max_position_embeddings == spec.context_length
            == toy.tokenizer.model_max_length)
    # Seeded: the same preset twice gives identical weights.
    again = load_components("toy")
    assert all(torch.equal(a, b) for a, b in zip(toy.unet.parameters(), again.unet.parameters()))


def test_saved_pipeline_loads_offline_with_stock_diffusers(base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    image = pipe("a cat", num_inference_steps=2, output_type="np", guidance_scale=1.0).images
    assert image.shape == (1, 16, 16, 3)
    again = load_components(str(base_dir))
    assert again.image_size == 16


def test_xformers_missing_raises_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name == "xformers" or name.startswith("xformers."):
            raise ImportError("No module named 'xformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    from refl.components import ModelConfig

    with pytest.raises(RuntimeError, match=r"pip install social-refl\[xformers\]"):
        load_components(ModelConfig(name="tiny", attention="xformers"))


@pytest.mark.slow
def test_sd15_architecture_takes_lora():
    """SD 1.5's UNet shape from its published config, random weights, nothing downloaded."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6  # SD 1.5: 859.5M

    from refl.components import SDComponents

    components = SDComponents(unet, torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), None, None)
    params = add_lora(components, LoraConfig(rank=4, alpha=4))
    # 16 transformer blocks x 2 attentions x 4 projections x (A, B)
    assert len(params) == 16 * 2 * 4 * 2
    assert 0.7e6 < sum(p.numel() for p in params) < 0.9e6
