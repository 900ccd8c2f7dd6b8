"""A T5-less SD 3 on one zero T5 token (refl.components.zero_t5): the transformer's output and its weight
gradients equal the stock pipeline's 256-token context; the sampler, the training conditioning and the stock
pipeline call agree; only a T5-less SD 3 gets it."""

import pytest
import torch

from refl.components import (
    PIPELINE_T5_TOKENS,
    ZeroT5Attention,
    build_pipeline,
    load_components,
    t5_options,
)
from toyworld.pretrain_flow import PretrainFlowConfig, build_toy_flow, encode_prompts
from toyworld.world import ASSETS

PROMPTS = ["a large red circle in the center on a black background", ""]


def _both_contexts(components):
    """(full, short, pooled): the stock 256-token context, the one-token context and the pooled pair."""
    pipe = build_pipeline(components)
    full, _, full_pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu",
                                                 do_classifier_free_guidance=False)
    short, pooled = encode_prompts(components, PROMPTS)
    assert full.shape[1] == 16 + PIPELINE_T5_TOKENS and short.shape[1] == 17
    assert torch.equal(full[:, :17], short) and torch.equal(full_pooled, pooled)
    return full, short, pooled


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_zero_token_with_raised_logit_equals_the_pipelines_256(dtype):
    components = build_toy_flow(PretrainFlowConfig(n_layers=2, n_heads=2))
    full, short, pooled = _both_contexts(components)
    transformer = components.transformer.to(dtype)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)  # (B, C, h, w)
    t = torch.tensor([250.0, 900.0])

    def run(context):
        return transformer(x, encoder_hidden_states=context.to(dtype), pooled_projections=pooled.to(dtype),
                           timestep=t).sample  # (B, C, h, w)

    with torch.no_grad():
        stock, short_out = run(full), run(short)  # the 256 tokens go through the stock processor
        transformer.set_attn_processor(ZeroT5Attention(17, copies=1))  # one zero token counted once
        wrong = run(short)
    err, err_wrong = (stock - short_out).abs().max().item(), (stock - wrong).abs().max().item()
    assert err < (1e-5 if dtype == torch.float32 else 3e-2) * stock.abs().max().item()
    assert err_wrong > 4 * err


def test_weight_gradients_equal_the_pipelines_256():
    """ReFL and DPO/KTO train through the short context: the same function of the weights, so the same
    gradient."""
    components = build_toy_flow(PretrainFlowConfig(n_layers=2, n_heads=2))
    full, short, pooled = _both_contexts(components)
    transformer = components.transformer.requires_grad_(True)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, h, w)
    grads = []
    for context in (full, short):
        transformer.zero_grad()
        out = transformer(x, encoder_hidden_states=context, pooled_projections=pooled,
                          timestep=torch.tensor([400.0, 700.0])).sample
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape and grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5 * grads[0].abs().max().item())


def test_shipped_model_samples_the_same_images_as_the_stock_256_token_call():
    from diffusers import StableDiffusion3Pipeline

    from refl.conditioning import encode
    from refl.sampling import family_scheduler, make_pipeline, sample

    components = load_components(str(ASSETS / "toy-flow"))
    assert isinstance(next(iter(components.transformer.attn_processors.values())), ZeroT5Attention)
    assert t5_options(components.transformer) == {"max_sequence_length": 1}
    assert encode(components, PROMPTS[:1]).hidden.shape[1] == 17  # the training conditioning's short context
    pipe = make_pipeline(components, family_scheduler(components.family))
    ours = sample(pipe, PROMPTS[:1] * 2, seeds=[3, 4], num_inference_steps=6, guidance_scale=4.0, output="pt")
    stock = StableDiffusion3Pipeline.from_pretrained(ASSETS / "toy-flow", text_encoder_3=None,
                                                     tokenizer_3=None, dtype=torch.float32)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    theirs = stock(PROMPTS[:1] * 2, num_inference_steps=6, guidance_scale=4.0, generator=gens, height=32,
                   width=32, output_type="pt").images  # (B, 3, H, W), the stock processor on 256 zero tokens
    assert theirs.shape == ours.shape == (2, 3, 32, 32)
    assert (ours - theirs).abs().max() < 1e-3


def test_only_a_t5_less_sd3_collapses():
    with_t5 = load_components("tiny-sd3")
    assert with_t5.text_encoder_3 is not None and t5_options(with_t5.transformer) == {}
    assert t5_options(load_components("tiny").unet) == {}
