"""refl.step: the reward-gradient step, its gradient methods and their contract, checkpointing and the KL
term, on the tiny preset."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers.grad_methods import last_step, registering, unet_calls
from helpers.lora import randomise_lora_b, tiny_lora
from helpers.training import PROMPTS, lora_file, tiny_train_overrides

from refl.step import (
    GRAD_METHODS,
    GradMethod,
    MethodResult,
    NonFiniteLossError,
    StepConfig,
    checkpointing_for,
    ignored_knobs,
    register_grad_method,
    reward_step,
    validate_step_config,
)

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting (100x slower).
torch.set_num_threads(1)


def brightness(images, prompts):
    """A stand-in reward: mean pixel value of each decoded image, (B,)."""
    return images.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- the step
@pytest.mark.parametrize("method,kw,expected_grad,expected_total", [
    ("refl", {}, 1, None),
    ("draft", {"draft_k": 3}, 3, 10),
    ("draft_lv", {"draft_lv_n": 2}, 2, 12),
])
def test_no_grad_grad_split(method, kw, expected_grad, expected_total):
    components, params = tiny_lora()
    calls, handle = unet_calls(components)
    cfg = StepConfig(method=method, num_inference_steps=10, cut_range=[4, 8], **kw)
    out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(0))
    handle.remove()
    assert sum(calls) == expected_grad
    if method == "refl":
        cut = int(out["cut"])
        assert 4 <= cut <= 8 and len(calls) == cut + 1 and calls[-1]  # cut no-grad calls, then the one
    else:
        assert len(calls) == expected_total
    out["loss"].backward()
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    for module in components.modules().values():
        for name, p in module.named_parameters():
            if "lora_" not in name:
                assert p.grad is None, name


def test_alignprop_and_ddpm_with_guidance_run():
    components, params = tiny_lora()
    for cfg in [StepConfig(method="alignprop", num_inference_steps=6, cut_range=[3, 5]),
                StepConfig(method="refl", scheduler="ddpm", guidance_scale=3.0, num_inference_steps=6,
                           cut_range=[2, 5], reg_weight=0.5)]:
        reg = (torch.randn(2, 4, 8, 8), PROMPTS[:2])
        out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(0),
                          reg_batch=reg)
        out["loss"].backward()
        assert all(p.grad is not None for p in params)
    assert "reg_loss" in out and out["loss"] > out["reward_loss"]
    with pytest.raises(ValueError, match="unknown gradient method"):
        reward_step(components, PROMPTS[:1], brightness, StepConfig(method="nope"), torch.Generator())
    with pytest.raises(ValueError, match="unknown scheduler"):
        reward_step(components, PROMPTS[:1], brightness, StepConfig(scheduler="euler"), torch.Generator())


# Every registered method (a new one cannot skip the KL test), and one with a text-encoder LoRA.
@pytest.mark.parametrize("method,text_lora", [(m, False) for m in sorted(GRAD_METHODS)] + [("draft", True)])
def test_kl_to_base_is_zero_for_identity_lora_and_pulls_back_otherwise(method, text_lora):
    components, params = tiny_lora(train_text_encoder=text_lora)
    cfg = StepConfig(method=method, num_inference_steps=6, cut_range=[3, 4], draft_k=2, guidance_scale=2.0,
                     kl_weight=1.0)
    out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(0))
    assert out["kl_loss"].item() == 0.0  # B = 0 at init: the tuned model is the base model
    randomise_lora_b(components)
    cfg_kl_only = StepConfig(**{**cfg.__dict__, "grad_scale": 0.0})
    out = reward_step(components, PROMPTS[:2], brightness, cfg_kl_only, torch.Generator().manual_seed(0))
    assert out["kl_loss"].item() > 1e-6 and torch.isclose(out["loss"], out["kl_loss"])
    out["loss"].backward()
    for module in components.modules().values():
        for name, p in module.named_parameters():
            assert ("lora_" in name) == (p.grad is not None), name
    # A small step against the KL gradient lowers the KL: the penalty pulls toward the base model.
    with torch.no_grad():
        for p in params:
            p -= 1e-2 * p.grad / (p.grad.norm() + 1e-12)
    again = reward_step(components, PROMPTS[:2], brightness, cfg_kl_only, torch.Generator().manual_seed(0))
    assert again["kl_loss"] < out["kl_loss"]
    # Adapters are back on after the base-model passes.
    assert all(not getattr(m, "_disable_adapters", False) for m in components.unet.modules())


# ----------------------------------------------------------------------------- the gradient-method contract
@pytest.fixture
def registered():
    """register(name, method) for one test; the registry is as before afterwards."""
    with registering() as register:
        yield register


@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_every_method_keeps_the_contract(method):
    components, params = tiny_lora()
    randomise_lora_b(components)
    calls, handle = unet_calls(components)
    cfg = StepConfig(method=method, num_inference_steps=5, cut_range=[1, 3], draft_k=2, kl_weight=1.0)
    validate_step_config(cfg)
    out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(0))
    handle.remove()
    # Each UNet call with gradient went through grad_eps: one KL base call (no gradient) follows each.
    with_grad = calls.count(True)
    assert with_grad >= 1 and out["kl_loss"] > 0
    assert [c for i, c in enumerate(calls) if i > 0 and calls[i - 1]] == [False] * with_grad
    # The no-grad prefix is what the method declares for the cut it reports (refl: `cut` calls; DRaFT-LV and
    # Direct-Align first finish the sample, so theirs is the whole trajectory).
    cut = int(out["cut"])
    assert 0 <= cut < 5
    assert calls.index(True) == GRAD_METHODS[method].bench.calls(replace(cfg, cut_range=[cut, cut]))[0]
    out["loss"].backward()
    assert any(p.grad.abs().sum() > 0 for p in params)
    # Declared knobs are StepConfig fields with a check that passes on the config above.
    for knob, check in GRAD_METHODS[method].knobs.items():
        assert hasattr(cfg, knob)
        check(cfg)


def test_every_step_knob_is_shared_or_read_by_a_method():
    from dataclasses import fields

    from refl.step import SHARED_KNOBS

    read = set(SHARED_KNOBS).union(*(m.knobs for m in GRAD_METHODS.values()))
    assert {f.name for f in fields(StepConfig)} == read


def test_knobs_of_another_method_are_reported_not_checked():
    # draft reads draft_k; the default cut_range [30, 39] does not fit 10 steps, but draft never reads it.
    validate_step_config(StepConfig(method="draft", num_inference_steps=10))
    with pytest.raises(ValueError, match="cut_range"):
        validate_step_config(StepConfig(method="refl", num_inference_steps=10))
    with pytest.raises(ValueError, match="draft_k"):
        validate_step_config(StepConfig(method="draft", num_inference_steps=10, draft_k=11))
    assert ignored_knobs(StepConfig(method="draft", num_inference_steps=10)) == []
    (line,) = ignored_knobs(StepConfig(method="draft", cut_range=[1, 2], draft_k=3))
    assert line.startswith("step.cut_range=[1, 2] is ignored by step.method=draft") and "step.draft_k" in line
    assert len(ignored_knobs(StepConfig(method="refl", draft_k=3, draft_lv_n=4))) == 2


def test_registering_a_method_checks_its_name_and_knobs(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_grad_method("refl", GRAD_METHODS["refl"])
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        register_grad_method("x", GradMethod(last_step, GRAD_METHODS["refl"].checkpointing, {"lr": print}))
    with pytest.raises(ValueError, match="kl_weight"):  # shared: every method reads it already
        register_grad_method("x",
                             GradMethod(last_step, GRAD_METHODS["refl"].checkpointing, {"kl_weight": print}))
    assert "x" not in GRAD_METHODS


def test_a_method_breaking_the_contract_is_named(registered):
    components, _ = tiny_lora()
    policy = GRAD_METHODS["refl"].checkpointing

    def returns_a_tuple(ctx, latents):
        return [last_step(ctx, latents).predictions[0]], {"cut": 3}

    def calls_the_unet_itself(ctx, latents):  # gradient, but past the context: no checkpointing, no KL
        t = ctx.timesteps[-1]
        eps = ctx.components.unet(latents, t, **ctx.cond.unet_kwargs()).sample
        return MethodResult([ctx.step(eps, t, latents).pred_original_sample], 3)

    def cut_outside(ctx, latents):
        return MethodResult(last_step(ctx, latents).predictions, 4)

    for name, run, error in [("tuple", returns_a_tuple,
                              "'tuple' returned tuple, not a refl.step.MethodResult"),
                             ("bypass", calls_the_unet_itself, "'bypass' made no UNet call through"),
                             ("cut", cut_outside, r"'cut' returned cut=4, outside \[0, "
                                                  r"num_inference_steps=4\)")]:
        registered(name, GradMethod(run, policy))
        with pytest.raises((TypeError, ValueError), match=error):
            reward_step(components, PROMPTS[:1], brightness, StepConfig(method=name, num_inference_steps=4),
                        torch.Generator().manual_seed(0))


def test_a_registered_method_trains_with_checkpointing_and_kl(registered, tmp_path, caplog):
    """A new method is its function plus one registration: training, checkpointing and the KL term
    need no other file. It declares no knob, so the cut_range of the overrides is reported as ignored."""
    from refl.components import Checkpointing
    from refl.train import ReflConfig, train
    from runkit.config import load_config

    registered("last_step", GradMethod(last_step, Checkpointing(unet="calls", vae_decoder=True)))
    cfg = load_config(ReflConfig, None, tiny_train_overrides(tmp_path, updates=2) + [
        "step.method=last_step", "step.kl_weight=1.0", "train.gradient_checkpointing=true"])
    with caplog.at_level("WARNING", logger="refl.train"):
        result = train(cfg)
    assert result["updates"] == 2
    assert any("step.cut_range=[1, 3] is ignored by step.method=last_step" in r.message
               for r in caplog.records)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2 and all(r["train/cut"] == 3 and r["train/kl_loss"] >= 0 for r in train_rows)
    lora = lora_file(tmp_path / "checkpoints" / "update-000002")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained


def _tiny_critic(dtype=torch.float32):
    from reward.model import CriticConfig, create_critic

    critic = create_critic(CriticConfig(model_name="tiny-clip",
                                        training_mode="all")).eval().requires_grad_(False)
    critic.clip.to(dtype)
    return critic


# Every step that can carry gradient: guidance doubles the UNet batch, the KL term adds base calls.
CKPT_STEP = dict(num_inference_steps=4, cut_range=[1, 2], draft_k=2, guidance_scale=2.0, kl_weight=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_checkpointing_leaves_lora_gradients_unchanged(method, dtype):
    # LoRA dropout: a forward rerun in backward must draw the masks of the first run again.
    components, params = tiny_lora(dropout=0.1)
    components.to(dtype=dtype)
    randomise_lora_b(components)
    critic = _tiny_critic(dtype)
    # The denoising regulariser adds one more UNet call with gradient, checkpointed by the same policy.
    cfg = StepConfig(method=method, reg_weight=1.0, **CKPT_STEP)
    unet = components.unet.config
    reg_latents = torch.randn(2, unet.in_channels, unet.sample_size, unet.sample_size,
                              generator=torch.Generator().manual_seed(2))  # (B', C, h, w)
    grads, reruns = {}, {}
    for enabled in (False, True):
        policy = checkpointing_for(method, enabled)
        components.set_gradient_checkpointing(policy)
        critic.set_grad_checkpointing(policy.critic)
        torch.manual_seed(0)
        calls, handle = unet_calls(components)
        out = reward_step(components, PROMPTS[:2], critic, cfg, torch.Generator().manual_seed(0),
                          reg_batch=(reg_latents, PROMPTS[:2]))
        forward_calls, with_grad = len(calls), calls.count(True)
        out["loss"].backward()
        handle.remove()
        reruns[enabled] = (len(calls) - forward_calls, with_grad)  # (UNet calls in backward, with gradient)
        grads[enabled] = torch.cat([p.grad.flatten() for p in params])
        for p in params:
            p.grad = None
    assert checkpointing_for(method, True).any and not checkpointing_for(method, False).any
    # Whole calls: backward reruns every UNet call with gradient once, the regulariser's included.
    assert reruns[False][0] == 0 and reruns[True][0] == reruns[True][1] >= 2
    scale = grads[False].abs().max()
    assert scale > 0
    # Same kernels on the same inputs: fp32 agrees to rounding; bf16 within a few of its ulps of the largest.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(grads[True], grads[False], rtol=tol, atol=tol * scale), \
        (grads[True] - grads[False]).abs().max() / scale


@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_checkpointing_reruns_each_forward_at_most_once(method):
    from refl.components import Checkpointing
    from refl.counting import count, recompute_ratios

    components, params = tiny_lora()
    randomise_lora_b(components)
    critic = _tiny_critic()
    # every no-grad call is then a prefix call
    step = StepConfig(method=method, **{**CKPT_STEP, "kl_weight": 0.0})
    watched = {"unet": components.unet, "vae_decoder": components.vae.decoder, "critic": critic}

    def update(timer):
        out = reward_step(components, PROMPTS[:2], critic, step, torch.Generator().manual_seed(0),
                          timer=timer)
        out["loss"].backward()
        for p in params:
            p.grad = None

    def counted(policy):
        components.set_gradient_checkpointing(policy)
        critic.set_grad_checkpointing(policy.critic)
        return count(update, watched, torch.device("cpu"))

    # The settings the benchmark compares: the method's own policy is one of them.
    settings = GRAD_METHODS[method].bench.settings
    assert checkpointing_for(method, True) in settings.values()
    calls, handle = unet_calls(components)
    plain = counted(Checkpointing())
    handle.remove()
    unet = plain["forward_flops"]["unet"]
    # Without checkpointing each call with gradient runs its forward once: as many FLOPs as a no-grad call
    # of the prefix (same shapes) per call.
    assert calls.count(True) >= 1 and calls.count(False) >= 1
    assert unet["grad"] / calls.count(True) == unet["no_grad"] / calls.count(False)
    assert recompute_ratios(plain, plain) == {"unet": 1.0, "vae_decoder": 1.0, "critic": 1.0, "all": 1.0}
    for name, policy in settings.items():
        found = counted(policy)
        ratios = recompute_ratios(found, plain)
        assert all(1.0 < r <= 2.0 for r in ratios.values()), (name, ratios)
        # ... and no module anywhere on the gradient path runs its forward more than twice per call.
        twice = {k: (n, plain["grad_forwards"][k]) for k, n in found["grad_forwards"].items()
                 if n > 2 * plain["grad_forwards"][k]}
        assert not twice, (name, twice)
    # Both levels at once, what alignprop did before, reruns the UNet's blocks twice.
    components.set_gradient_checkpointing(Checkpointing(unet="calls", vae_decoder=True, critic=True))
    components.unet.enable_gradient_checkpointing()
    nested = count(update, watched, torch.device("cpu"))
    assert recompute_ratios(nested, plain)["unet"] > 2.0
    assert (nested["grad_forwards"]["unet.mid_block.resnets.1"]
            == 3 * plain["grad_forwards"]["unet.mid_block.resnets.1"])


def test_nan_loss_raises_clear_error_before_any_update():
    components, params = tiny_lora()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)

    def nan_reward(images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")

    with pytest.raises(NonFiniteLossError, match="update 7"):
        out = reward_step(components, PROMPTS[:2], nan_reward,
                          StepConfig(num_inference_steps=4, cut_range=[1, 3]),
                          torch.Generator().manual_seed(0), step_name="update 7")
        out["loss"].backward()
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, params))
