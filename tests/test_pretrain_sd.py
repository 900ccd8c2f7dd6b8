import json
import os
import stat

import numpy as np
import torch

from toyworld.pretrain_sd import PretrainSDConfig, pretrain_toy_sd


def test_pretraining_writes_a_stock_loadable_fp16_pipeline(tmp_path):
    out = tmp_path / "toy-sd"
    cfg = PretrainSDConfig(n_images=128, vae_updates=3, vae_batch_size=16, unet_updates=3, unet_batch_size=16,
                           unet_minutes=0, n_eval_prompts=4, eval_num_inference_steps=2, output_dir=str(out))
    report = pretrain_toy_sd(cfg)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    # The VAE's scaling factor is fitted so latents have unit variance, as SD's convention wants.
    assert pipe.vae.config.scaling_factor == 1.0 / report["latent_std"]
    from safetensors import safe_open

    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    images = pipe(["a large red circle in the center on a black background"], num_inference_steps=2,
                  guidance_scale=2.0, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700
    saved = json.loads((out / "pretrain_report.json").read_text())
    assert 0.0 <= saved["eval_prompt_fidelity"] <= 1.0 and saved["unet_updates"] == 3
    # The VAE's ceiling is measured against renders the checker reads perfectly.
    assert saved["vae_ceiling_fidelity"]["renders"] == 1.0
    assert 0.0 <= saved["vae_ceiling_fidelity"]["vae_reconstructions"] <= 1.0
    assert pipe.vae.config.norm_num_groups == 8  # not one channel per group (that normalises colour away)
