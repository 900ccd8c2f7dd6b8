"""The flow-matching families in the one components factory: tiny-sd3 and tiny-flux build the real diffusers
and transformers classes, every part asks `family`, their T5 tokenizer is built offline, and a saved model
directory is recognised by its own model_index.json and loads back identical."""

from __future__ import annotations

import json

import pytest
import torch

from refl.components import (
    FAMILY_PIPELINES,
    build_pipeline,
    build_t5_tokenizer,
    load_components,
    save_pipeline,
)

torch.set_num_threads(1)


def test_families_of_every_preset():
    expected = {"tiny": "sd", "tiny-v": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-flux": "flux"}
    for name, family in expected.items():
        components = load_components(name)
        assert components.family == family, name
        assert components.is_flow == (family in ("sd3", "flux"))
        assert components.is_sdxl == (family == "sdxl")
        assert type(build_pipeline(components)).__name__ == FAMILY_PIPELINES[family]
        assert components.denoiser_name in components.modules()


def test_tiny_sd3_layout():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    c = load_components("tiny-sd3")
    assert isinstance(c.transformer, SD3Transformer2DModel) and c.unet is None
    assert isinstance(c.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(c.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(c.text_encoder_3, T5EncoderModel)
    assert isinstance(c.scheduler, FlowMatchEulerDiscreteScheduler) and c.scheduler.config.shift == 3.0
    assert c.vae.config.latent_channels == 16 and c.vae.config.shift_factor == pytest.approx(0.0609)
    assert c.vae.config.scaling_factor == pytest.approx(1.5305)
    assert (c.image_size, c.latent_size, c.latent_channels) == (16, 8, 16)
    # the pooled embedding is both CLIPs' projections side by side; T5 is the joint attention width
    assert c.transformer.config.pooled_projection_dim == 2 * c.text_encoder.config.projection_dim
    assert c.transformer.config.joint_attention_dim == c.text_encoder_3.config.d_model


def test_tiny_flux_layout():
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    c = load_components("tiny-flux")
    assert isinstance(c.transformer, FluxTransformer2DModel) and c.transformer.config.guidance_embeds
    assert type(c.text_encoder) is CLIPTextModel and isinstance(c.text_encoder_2, T5EncoderModel)
    assert c.text_encoder_3 is None
    assert c.transformer.config.in_channels == 4 * c.latent_channels  # 2x2 packed latents
    assert c.scheduler.config.use_dynamic_shifting
    assert c.vae.config.shift_factor == pytest.approx(0.1159)
    assert (c.image_size, c.latent_size) == (16, 8)
    again = load_components("tiny-flux")
    assert all(torch.equal(a, b) for a, b in zip(c.transformer.parameters(), again.transformer.parameters()))


def test_t5_tokenizer_offline_round_trip(tmp_path):
    from transformers import T5TokenizerFast

    tok = build_t5_tokenizer(32)
    ids = tok("a red Cat, 3 dogs!").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a red Cat, 3 dogs!"
    tok.save_pretrained(tmp_path)
    assert T5TokenizerFast.from_pretrained(tmp_path)("a red Cat, 3 dogs!").input_ids == ids


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_saved_flow_model_round_trips(name, tmp_path):
    c = load_components(name)
    path = save_pipeline(c, tmp_path / name)
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == FAMILY_PIPELINES[c.family]
    again = load_components(str(path))
    assert again.family == c.family and again.source == str(path)
    for a, b in zip(c.modules().values(), again.modules().values()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    public = {k: v for k, v in c.scheduler.config.items() if not k.startswith("_")}
    assert {k: again.scheduler.config[k] for k in public} == public
    prompt = "a red cat"
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(c, tok) is not None:
            assert getattr(again, tok)(prompt).input_ids == getattr(c, tok)(prompt).input_ids, tok


def test_sd_directory_still_recognised(base_dir):
    assert load_components(str(base_dir)).family == "sd"


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_random_weights_from_a_flow_directory(name, tmp_path):
    """model.random_weights on an SD 3 / FLUX directory: its architecture from model_index.json and the
    configs alone (the weight files are removed first), seeded, its own tokenizers and scheduler, and it
    samples through the stock pipeline."""
    import numpy as np

    from refl.components import ModelConfig
    from refl.sampling import make_pipeline, sample

    saved = load_components(name)
    path = save_pipeline(saved, tmp_path / name)
    for weights in path.glob("*/*.safetensors"):
        weights.unlink()
    random = ModelConfig(name=str(path), random_weights=True, seed=3)
    c = load_components(random)
    assert c.family == saved.family and c.source == f"random:{path}"
    for part, module in saved.modules().items():
        ours = c.modules()[part]
        assert type(ours) is type(module) and not ours.training, part
        shapes = {k: v.shape for k, v in module.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes, part
    # random, not the saved weights; the same seed builds the same weights, another seed others
    assert not torch.equal(next(c.transformer.parameters()), next(saved.transformer.parameters()))
    again, other = load_components(random), load_components(ModelConfig(name=str(path), random_weights=True))
    for part, module in c.modules().items():
        same = [torch.equal(a, b) for a, b in zip(module.parameters(), again.modules()[part].parameters())]
        assert all(same) and not all(torch.equal(a, b) for a, b in zip(module.parameters(),
                                                                       other.modules()[part].parameters()))
    public = {k: v for k, v in saved.scheduler.config.items() if not k.startswith("_")}
    assert {k: c.scheduler.config[k] for k in public} == public
    for tok in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        if getattr(saved, tok) is not None:
            assert getattr(c, tok)("a red cat").input_ids == getattr(saved, tok)("a red cat").input_ids, tok
    images = sample(make_pipeline(c, "flow_euler"), ["a red cat"], seeds=[0], num_inference_steps=2,
                    guidance_scale=3.0)
    assert images.shape == (1, c.image_size, c.image_size, 3) and np.isfinite(images).all()
    (path / "transformer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['transformer/config.json'\]"):
        load_components(random)
