"""refl.lora: adapters round-trip through a stock diffusers pipeline, and only they train, in fp32."""

from __future__ import annotations

import numpy as np
import torch
from helpers.lora import randomise_lora_b
from helpers.training import PROMPTS

from refl.components import build_pipeline, load_components
from refl.lora import LoraConfig, add_lora, save_lora, trainable_parameters

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting (100x slower).
torch.set_num_threads(1)


def test_lora_round_trip_through_stock_pipeline(base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=4, alpha=16.0, train_text_encoder=True))  # alpha != rank
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    tuned = run(build_pipeline(components))
    stock = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    base_images = run(stock)
    stock.load_lora_weights(tmp_path / "lora")
    reloaded = run(stock)
    assert np.abs(tuned - base_images).max() > 1e-2  # the LoRA does change the images
    assert np.abs(tuned - reloaded).max() < 1e-5


def test_only_lora_params_train_and_stay_fp32():
    components = load_components("tiny")
    components.to(dtype=torch.bfloat16)
    params = add_lora(components, LoraConfig())
    assert params and all(p.dtype == torch.float32 for p in params)
    assert trainable_parameters(components) == params
    assert any(p.dtype == torch.bfloat16 for p in components.unet.parameters())
