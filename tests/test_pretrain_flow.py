"""The toy flow model's pre-training script (toyworld/pretrain_flow.py): its smoke run loads in the stock
StableDiffusion3Pipeline and through refl.components (the shortcut for the pipeline's 256 zero T5 tokens:
tests/test_zero_t5.py)."""

import json

import numpy as np
import pytest
import torch

from toyworld.pretrain_flow import PretrainFlowConfig, with_projection

PROMPT = "a large red circle in the center on a black background"


def test_smoke_run_is_a_stock_sd3_directory_in_fp16(toy_flow_dir):
    from diffusers import StableDiffusion3Pipeline
    from safetensors import safe_open

    report = json.loads((toy_flow_dir / "pretrain_report.json").read_text())
    assert report["transformer_updates"] == 3 and report["updates_per_minute"] > 0
    assert 0.0 <= report["eval_prompt_fidelity"] <= 1.0 and report["eval_n_prompts"] == 4
    # The toy SD's VAE, frozen: the same ceiling as the toy SD's report measures with it.
    assert report["vae_ceiling_fidelity"]["renders"] == 1.0
    # Loaded as diffusers' SD 3 docs load a model without its T5.
    pipe = StableDiffusion3Pipeline.from_pretrained(toy_flow_dir, text_encoder_3=None, tokenizer_3=None,
                                                    dtype=torch.float32)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.in_channels == 4
    # SD 3's decode reads both: latents were normalised with the training renders' mean and spread.
    assert pipe.vae.config.shift_factor == pytest.approx(report["latent_mean"])
    assert pipe.vae.config.scaling_factor == pytest.approx(1.0 / report["latent_std"])
    with safe_open(str(toy_flow_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    images = pipe([PROMPT], num_inference_steps=2, guidance_scale=2.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_smoke_run_loads_through_the_components_factory(toy_flow_dir):
    from refl.components import ModelConfig, load_components
    from refl.sampling import family_scheduler, make_pipeline, sample

    components = load_components(str(toy_flow_dir))
    assert components.family == "sd3" and components.is_flow and components.text_encoder_3 is None
    assert components.image_size == 32 and components.latent_channels == 4
    pipe = make_pipeline(components, family_scheduler(components.family))
    images = sample(pipe, [PROMPT], seeds=[0], num_inference_steps=2, guidance_scale=4.0)
    assert images.shape == (1, 32, 32, 3)
    components.to(dtype=torch.bfloat16)  # the no-T5 zeros follow the text encoders' dtype
    with components.autocast():
        half = sample(pipe, [PROMPT], seeds=[0], num_inference_steps=2, guidance_scale=4.0, output="pt")
    assert torch.isfinite(half).all() and np.abs(half.float().numpy().transpose(0, 2, 3, 1) * 255
                                                 - images).mean() < 8  # bf16 rounding, same image
    # The architecture alone, from its configs (the no-T5 parts stay absent)
    random = load_components(ModelConfig(name=str(toy_flow_dir), random_weights=True, seed=3))
    assert random.family == "sd3" and random.text_encoder_3 is None
    assert random.transformer.config.num_layers == components.transformer.config.num_layers


def test_projection_is_the_identity_so_pooled_is_clips_own_end_of_text_state():
    from refl.components import load_components
    from toyworld.pretrain_flow import TOY_SD

    sd = load_components(TOY_SD)
    projected = with_projection(sd.text_encoder)
    ids = sd.tokenizer([PROMPT], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(projected(ids).text_embeds, sd.text_encoder(ids).pooler_output, atol=1e-6)
    assert not any(p.requires_grad for p in projected.parameters())


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="t_sampling"):
        PretrainFlowConfig(t_sampling="cosine")
    with pytest.raises(ValueError, match="patch_size"):
        PretrainFlowConfig(patch_size=3)


def test_an_output_dir_the_save_could_not_write_is_refused_before_training(tmp_path, monkeypatch):
    import toyworld.pretrain_flow as pretrain_flow
    from toyworld.pretrain_flow import pretrain_toy_flow

    monkeypatch.setattr(pretrain_flow, "render_training_data",
                        lambda *a, **k: pytest.fail("rendered before the output folder was checked"))
    taken = tmp_path / "model"
    taken.write_text("a file where the model folder would go")
    with pytest.raises(NotADirectoryError, match="output_dir .*model is a file"):
        pretrain_toy_flow(PretrainFlowConfig(output_dir=str(taken)))
