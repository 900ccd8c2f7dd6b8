"""Sampling from the flow-matching families through `refl.sampling.sample` (the stock
StableDiffusion3Pipeline / FluxPipeline): per-image seeds, the same images as a direct pipeline call,
embeddings from the pipeline's own encode_prompt, and the sampler each family takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from refl.components import load_components
from refl.sampling import encode_text, make_pipeline, make_scheduler, sample

torch.set_num_threads(1)

FLOW = ["tiny-sd3", "tiny-flux"]
PROMPTS = ["a red cat", "a blue square", "two green dogs"]


@pytest.fixture(scope="module", params=FLOW)
def flow(request):
    return load_components(request.param)


def test_samplers_fit_the_family(flow):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = make_scheduler("flow_euler", flow)
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler)
    assert sched.config.shift == flow.scheduler.config.shift
    with pytest.raises(ValueError, match=r"does not fit .*choose one of \['flow_euler'\]"):
        make_scheduler("ddim", flow)
    with pytest.raises(ValueError, match=r"choose one of \['ddim', 'ddpm'\]"):
        make_scheduler("flow_euler", load_components("tiny"))


def test_flow_samples_are_per_seed_and_match_the_stock_pipeline(flow):
    pipe = make_pipeline(flow, "flow_euler")
    kw = {"num_inference_steps": 4, "guidance_scale": 3.0}
    images = sample(pipe, PROMPTS, seeds=[5, 6, 7], batch_size=2, **kw)  # (3, H, W, 3) uint8
    assert images.shape == (3, flow.image_size, flow.image_size, 3)
    assert not np.array_equal(images[0], images[1])
    # an image depends on its seed only, not on its batch (float rounding of batched matmuls aside)
    batched = sample(pipe, PROMPTS, seeds=[5, 6, 7], batch_size=2, output="pt", **kw)  # (3, 3, H, W)
    alone = sample(pipe, PROMPTS[1:2], seeds=[6], output="pt", **kw)
    torch.testing.assert_close(alone[0], batched[1], rtol=0, atol=1e-5)
    other = sample(pipe, PROMPTS[1:2], seeds=[8], output="pt", **kw)
    assert (other[0] - batched[1]).abs().max() > 0.05
    # a direct stock call with the same generator draws the same image
    size = flow.image_size
    direct = pipe(PROMPTS[2], generator=torch.Generator("cpu").manual_seed(7), height=size, width=size,
                  output_type="pt", **kw).images  # (1, 3, H, W)
    ours = sample(pipe, PROMPTS[2:], seeds=[7], output="pt", **kw)
    torch.testing.assert_close(ours, direct, rtol=0, atol=0)
    # the latents are unpacked (B, C, h, w) whatever the family
    latents = sample(pipe, PROMPTS[:1], seeds=[7], output="latent", **kw)
    assert latents.shape == (1, flow.latent_channels, flow.latent_size, flow.latent_size)


def test_flow_embeddings_from_the_pipelines_encode_prompt(flow):
    pipe = make_pipeline(flow, "flow_euler")
    embeds = encode_text(pipe, PROMPTS[0], guidance_scale=3.0)
    assert embeds["pooled_prompt_embeds"].shape[0] == 1
    if flow.family == "flux":
        assert "negative_prompt_embeds" not in embeds  # guidance-distilled: no negative pass
    else:
        assert embeds["negative_prompt_embeds"].shape == embeds["prompt_embeds"].shape
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0}
    from_embeds = sample(pipe, embeds=embeds, seeds=[1, 2], **kw)
    from_prompts = sample(pipe, [PROMPTS[0]] * 2, seeds=[1, 2], **kw)
    np.testing.assert_array_equal(from_embeds, from_prompts)


@pytest.mark.parametrize("name", FLOW)
def test_flow_lora_round_trips_through_the_stock_pipeline(name, tmp_path):
    from helpers.lora import randomise_lora_b

    from refl.components import pipeline_class, save_pipeline
    from refl.lora import DEFAULT_TARGETS, LoraConfig, add_lora, save_lora

    components = load_components(name)
    save_pipeline(components, tmp_path / "base")
    params = add_lora(components, LoraConfig(rank=4, alpha=16.0))  # alpha != rank
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in components.transformer.named_parameters()
               if ".lora_A" in n}
    # every joint block's attention of both streams and its two feed-forwards (FLUX: and the single blocks)
    for target in DEFAULT_TARGETS[components.family]:
        assert any(n.endswith(target) for n in adapted), target
    if components.family == "sd3":  # the last joint block keeps no text output: its text queries are dead
        last = len(components.transformer.transformer_blocks) - 1
        assert f"transformer_blocks.{last}.attn.add_q_proj" not in adapted
        assert f"transformer_blocks.{last}.attn.add_k_proj" in adapted
    else:  # the single blocks' output projection, not the transformer's final output layer of that name
        assert "single_transformer_blocks.0.proj_out" in adapted and "proj_out" not in adapted
    assert len(params) == 2 * len(adapted)
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "output": "pt"}
    tuned = sample(make_pipeline(components, "flow_euler"), PROMPTS[:2], seeds=[0, 1], **kw)
    stock = pipeline_class(components.family).from_pretrained(tmp_path / "base")
    stock.set_progress_bar_config(disable=True)
    base_images = sample(stock, PROMPTS[:2], seeds=[0, 1], **kw)
    stock.load_lora_weights(tmp_path / "lora")
    reloaded = sample(stock, PROMPTS[:2], seeds=[0, 1], **kw)
    assert (tuned - base_images).abs().max() > 1e-2  # the LoRA does change the images
    assert (tuned - reloaded).abs().max() < 1e-5


@pytest.mark.parametrize("name", FLOW)
def test_flow_text_encoder_lora_round_trips_through_the_stock_pipeline(name, tmp_path):
    """lora.train_text_encoder on a flow model: adapters on the CLIP encoders the stock pipeline loads LoRA
    for (SD 3: both, FLUX: CLIP-L; never T5), reloaded exactly by load_lora_weights."""
    from helpers.lora import randomise_lora_b
    from safetensors import safe_open

    from refl.components import pipeline_class, save_pipeline
    from refl.lora import LoraConfig, add_lora, save_lora

    components = load_components(name)
    save_pipeline(components, tmp_path / "base")
    add_lora(components, LoraConfig(rank=4, alpha=16.0, train_text_encoder=True))
    adapted = {n for n, m in components.modules().items()
               if any("lora_" in k for k, _ in m.named_parameters())}
    assert adapted == ({"transformer", "text_encoder", "text_encoder_2"} if components.family == "sd3"
                       else {"transformer", "text_encoder"})  # FLUX's text_encoder_2 is T5
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == adapted
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "output": "pt"}
    tuned = sample(make_pipeline(components, "flow_euler"), PROMPTS[:2], seeds=[0, 1], **kw)
    stock = pipeline_class(components.family).from_pretrained(tmp_path / "base")
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(tmp_path / "lora")
    assert (tuned - sample(stock, PROMPTS[:2], seeds=[0, 1], **kw)).abs().max() < 1e-5
