"""The reward-gradient step on the flow-matching families (tiny-sd3, tiny-flux): the model's own flow-match
schedule, x0 from the velocity, every registered method with guidance, the KL term and the denoising
regulariser in bf16, and a short ReFL run through refl.train whose LoRA the stock pipeline loads."""

from __future__ import annotations

import pytest
import torch
from helpers.lora import randomise_lora_b
from helpers.training import PROMPTS

from refl.components import load_components
from refl.lora import LoraConfig, add_lora
from refl.sampling import make_pipeline, make_scheduler, sample
from refl.step import GRAD_METHODS, StepConfig, reward_step
from refl.step.blocks import flow_step, set_timesteps

torch.set_num_threads(1)

FLOW = ["tiny-sd3", "tiny-flux"]


def brightness(images, prompts):
    """A stand-in reward: mean pixel value of each decoded image, (B,)."""
    return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("name", FLOW)
def test_timesteps_are_the_stock_pipelines(name):
    components = load_components(name)
    pipe = make_pipeline(components, "flow_euler")
    sample(pipe, PROMPTS[:1], seeds=[0], num_inference_steps=5, output="latent")
    ours = make_scheduler("flow_euler", components)
    set_timesteps(components, ours, 5)
    torch.testing.assert_close(ours.timesteps, pipe.scheduler.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(ours.sigmas, pipe.scheduler.sigmas, rtol=0, atol=0)
    # the model's own shift: more of the trajectory at high noise than uniform steps would give
    assert ours.sigmas[2] > 1 - 2 / 5


def test_x0_from_velocity_and_the_euler_step_by_hand():
    components = load_components("tiny-sd3")
    sched = make_scheduler("flow_euler", components)
    set_timesteps(components, sched, 4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    t = sched.timesteps[1]
    sigma, sigma_next = float(sched.sigmas[1]), float(sched.sigmas[2])
    xt = (1 - sigma) * x0 + sigma * noise
    v = noise - x0  # the exact velocity of this path
    out = flow_step(sched, v, t, xt)
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, (1 - sigma_next) * x0 + sigma_next * noise, rtol=0, atol=1e-5)
    # the same step as the scheduler's own (stateful) step
    sched.set_begin_index(1)  # its counter at step 1
    torch.testing.assert_close(out.prev_sample, sched.step(v, t, xt).prev_sample, rtol=0, atol=1e-6)


@pytest.fixture(scope="module", params=FLOW)
def flow_lora(request):
    components = load_components(request.param).to(dtype=torch.bfloat16)
    add_lora(components, LoraConfig(rank=2, alpha=4.0))  # fp32 adapters on a bf16 base, as training has
    randomise_lora_b(components, seed=3)  # B = 0 would leave every A without gradient
    return components


@pytest.mark.parametrize("method", list(GRAD_METHODS))
def test_every_method_trains_every_lora_module_bf16(flow_lora, method):
    components = flow_lora
    params = {n: p for n, p in components.transformer.named_parameters() if "lora_" in n}
    for p in params.values():
        p.grad = None
    cfg = StepConfig(method=method, scheduler="flow_euler", num_inference_steps=4, cut_range=[1, 3],
                     draft_k=2, guidance_scale=3.0, kl_weight=0.5, reg_weight=0.5, grad_scale=1.0)
    g = torch.Generator().manual_seed(0)
    reg = (torch.randn(2, 16, 8, 8, generator=g), PROMPTS[:2])
    out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(1),
                      reg_batch=reg)
    assert torch.isfinite(out["loss"]) and out["kl_loss"] > 0 and out["reg_loss"] > 0
    out["loss"].backward()
    silent = {n.split(".lora_")[0] for n, p in params.items()
              if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0}
    assert not silent, silent
    assert all(p.dtype == torch.float32 for p in params.values())


@pytest.mark.parametrize("name", FLOW)
def test_text_encoder_lora_trains_on_flow_models_bf16(name):
    """lora.train_text_encoder: the CLIP adapters get gradient through the stock pipeline's encode_prompt
    (SD 3's negative pass included), and the KL term reads the base text encoders."""
    components = load_components(name).to(dtype=torch.bfloat16)
    add_lora(components, LoraConfig(rank=2, alpha=4.0, train_text_encoder=True))
    randomise_lora_b(components, seed=3)
    params = {f"{part}.{n}": p for part, m in components.modules().items() for n, p in m.named_parameters()
              if "lora_" in n}
    assert any(n.startswith("text_encoder.") for n in params)
    cfg = StepConfig(method="refl", scheduler="flow_euler", num_inference_steps=3, cut_range=[1, 2],
                     guidance_scale=3.0, kl_weight=0.5, grad_scale=1.0)
    out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(1))
    assert torch.isfinite(out["loss"]) and out["kl_loss"] > 0
    out["loss"].backward()
    silent = {n.split(".lora_")[0] for n, p in params.items()
              if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0}
    assert not silent, silent


def test_short_refl_run_on_tiny_flux_saves_a_lora_the_stock_pipeline_loads(tmp_path, capsys):
    import json

    from helpers.training import tiny_train_overrides

    from refl.cli import train_main
    from refl.components import pipeline_class, save_pipeline

    base = save_pipeline(load_components("tiny-flux"), tmp_path / "base")
    out = tmp_path / "run"
    argv = []
    for o in tiny_train_overrides(out, updates=2) + [
            "model.name=tiny-flux", "step.scheduler=flow_euler", "lora.dropout=0.0", "train.validate_every=2",
            "train.mixed_precision=bf16", "step.guidance_scale=3.0", "step.kl_weight=0.1",
            "step.reg_weight=0.1", "data.reg_pool_size=2", "train.validation_guidance_scale=3.0"]:
        argv += ["--set", o]
    assert train_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["updates"] == 2 and "train/reg_loss" in result and "train/kl_loss" in result
    assert (out / "samples" / "update-000002.png").is_file()
    card = (out / "lora" / "README.md").read_text()  # the model card names the family and its pipeline
    assert "| model family | `flux` (`FluxPipeline`) |" in card and "\n- flux\n" in card
    assert "FluxPipeline.from_pretrained" in card and "on the transformer |" in card
    assert "writes the diffusers layout" in card  # the export for ComfyUI / Forge
    stock = pipeline_class("flux").from_pretrained(base)
    stock.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 3, "guidance_scale": 3.0, "output": "pt"}
    before = sample(stock, PROMPTS[:1], seeds=[0], **kw)
    stock.load_lora_weights(out / "lora")
    assert (sample(stock, PROMPTS[:1], seeds=[0], **kw) - before).abs().max() > 0  # the trained update
