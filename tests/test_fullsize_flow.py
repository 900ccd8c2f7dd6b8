"""Stable Diffusion 3.5 medium at full size with random weights (nothing downloaded): slow, run by hand.

    .venv/bin/python -m pytest -m slow tests/test_fullsize_flow.py -s

Its architecture builds from refl/model_configs/sd35m in bf16 (transformer 2.24B parameters, CLIP-L, CLIP-G
and T5-XXL's 4.76B-parameter encoder: about 16 GiB); one ReFL update at 256 px in bf16 with the training
path's memory measures: the prompt's embeddings computed once and the text encoders freed, the method's
checkpointing on the transformer's blocks, CFG 4.5. It prints the peak RSS of the process; run the file alone
(`/usr/bin/time -v` beside it) for a figure that belongs to it. FLUX.1-dev and SD 3.5 large do not fit this
machine in memory: their architectures are counted on the meta device (benchmarks/memory_model.py,
tests/test_memory_model_meta.py).
"""

from __future__ import annotations

import gc
import resource
import time

import pytest
import torch

from refl.components import build_architecture
from refl.lora import LoraConfig, add_lora
from refl.step import StepConfig, checkpointing_for, reward_step
from refl.text_embeddings import precompute_text_embeddings

pytestmark = pytest.mark.slow
PROMPT = "a photo of an astronaut riding a horse on mars"


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


@pytest.fixture(scope="module")
def sd35m():
    start = time.perf_counter()
    components = build_architecture("sd35m", dtype=torch.bfloat16)
    print(f"\nSD 3.5 medium built in bf16 in {time.perf_counter() - start:.0f} s, peak RSS "
          f"{_peak_rss_gib():.2f} GiB")
    return components


def test_sd35m_architecture_builds_from_the_shipped_configs(sd35m):
    c = sd35m
    assert c.family == "sd3" and c.image_size == 1024 and c.latent_channels == 16
    assert c.dtype == torch.bfloat16
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in c.modules().items()}
    print(f"SD 3.5 medium parameters: { {k: f'{v / 1e6:.1f}M' for k, v in count.items()} }")
    assert 2.2e9 < count["transformer"] < 2.3e9  # 2.24B: 24 MMDiT-X blocks, 1536 wide
    assert 120e6 < count["text_encoder"] < 125e6 and 690e6 < count["text_encoder_2"] < 700e6
    assert 4.7e9 < count["text_encoder_3"] < 4.8e9  # T5-XXL's encoder
    blocks = c.transformer.transformer_blocks
    assert sum(b.attn2 is not None for b in blocks) == 13  # the dual-attention (MMDiT-X) blocks 0-12
    assert c.scheduler.config.shift == 3.0 and c.vae.config.shift_factor == 0.0609


def test_sd35m_refl_update_at_256px_bf16_with_checkpointing(sd35m):
    import reward

    c = sd35m
    start = time.perf_counter()
    precompute_text_embeddings(c, [PROMPT])  # T5 and both CLIPs run once, then are freed
    gc.collect()
    assert c.text_encoders() == {}
    c.set_image_size(256)
    params = add_lora(c, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():  # B starts at 0, which would leave A without gradient
        for p in params[1::2]:
            p.normal_(0.0, 1e-3)
    c.transformer.train()
    policy = checkpointing_for("refl", True, c.family)
    assert policy.unet == "blocks"  # the transformer's blocks, not its whole call
    c.set_gradient_checkpointing(policy)
    critic = reward.create_critic(model_name="ViT-L-14", training_mode="all").eval().requires_grad_(False)
    critic.clip.to(torch.bfloat16)
    critic.set_grad_checkpointing(policy.critic)
    cfg = StepConfig(method="refl", scheduler="flow_euler", num_inference_steps=4, cut_range=[2, 3],
                     guidance_scale=4.5)
    out = reward_step(c, [PROMPT], critic, cfg, torch.Generator().manual_seed(0))
    out["loss"].backward()
    grads = [p.grad for p in params]
    print(f"SD 3.5 medium refl bf16 256 px: loss {out['loss'].item():.4g}, "
          f"{time.perf_counter() - start:.0f} s, peak RSS {_peak_rss_gib():.2f} GiB")
    assert torch.isfinite(out["loss"])
    assert all(p.dtype == torch.float32 for p in params)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in critic.parameters())
