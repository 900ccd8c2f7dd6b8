"""Text embeddings computed once (refl.text_embeddings) on the flow families: a ReFL update with them equals
one with live encoding (loss and every LoRA gradient, bf16, guidance, KL and regulariser), the text encoders
are gone while a run trains, validation draws the same images, and the on-disk cache is keyed by content."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from helpers.lora import randomise_lora_b
from helpers.training import PROMPTS, tiny_train_overrides
from safetensors import safe_open

from refl.components import ModelConfig, load_components
from refl.lora import LoraConfig, add_lora
from refl.step import StepConfig, reward_step
from refl.text_embeddings import (
    cache_key,
    load_or_compute,
    pipeline_embeds,
    precompute_text_embeddings,
    precompute_wanted,
)

torch.set_num_threads(1)

FLOW = ["tiny-sd3", "tiny-flux"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def _update(components, cfg, reg):
    """One reward step and backward; (loss terms, LoRA gradients by name)."""
    params = {n: p for n, p in components.transformer.named_parameters() if "lora_" in n}
    for p in params.values():
        p.grad = None
    out = reward_step(components, PROMPTS[:2], brightness, cfg, torch.Generator().manual_seed(1),
                      reg_batch=reg)
    out["loss"].backward()
    return ({k: v.detach().clone() for k, v in out.items()},
            {n: p.grad.clone() for n, p in params.items() if p.grad is not None})


@pytest.mark.parametrize("name", FLOW)
def test_an_update_with_precomputed_embeddings_equals_live_encoding_bf16(name):
    components = load_components(name).to(dtype=torch.bfloat16)
    add_lora(components, LoraConfig(rank=2, alpha=4.0))
    randomise_lora_b(components, seed=3)
    cfg = StepConfig(method="refl", scheduler="flow_euler", num_inference_steps=4, cut_range=[1, 3],
                     guidance_scale=3.0, kl_weight=0.5, reg_weight=0.5, grad_scale=1.0)
    reg = (torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), PROMPTS[2:4])
    live, live_grads = _update(components, cfg, reg)

    t5_type = type(components.text_encoders()["text_encoder_3" if name == "tiny-sd3" else "text_encoder_2"])
    precompute_text_embeddings(components, PROMPTS)
    assert components.text_encoders() == {}
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, t5_type)]  # freed, not only detached
    cached, cached_grads = _update(components, cfg, reg)

    assert live.keys() == cached.keys() and live_grads.keys() == cached_grads.keys()
    for k in live:
        torch.testing.assert_close(cached[k], live[k], rtol=0, atol=0, msg=k)
    for n in live_grads:
        torch.testing.assert_close(cached_grads[n], live_grads[n], rtol=0, atol=0, msg=n)
    assert sum(g.abs().sum() for g in cached_grads.values()) > 0
    with pytest.raises(KeyError, match="'a prompt never seen' is not among the 5 prompts"):
        reward_step(components, ["a prompt never seen"], brightness, cfg, torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", FLOW)
def test_a_run_trains_without_text_encoders_and_validates_the_same_images(tmp_path, name):
    """train.precompute_text_embeddings (null: on for flow models) against false: during every reward call
    of the run the text encoders are alive only when it is off, and both runs log the same numbers."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from refl.config import ReflConfig
    from refl.train import train
    from runkit.config import load_config
    from runkit.logs import read_metrics

    encoders = (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, encoders)}
    alive_at_reward = {}
    metrics = {}
    for setting in ("null", "false"):
        seen = alive_at_reward.setdefault(setting, [])

        def contrast(images, prompts, seen=seen):
            gc.collect()
            seen.append(len([o for o in gc.get_objects() if isinstance(o, encoders) and id(o) not in before]))
            w = images.shape[-1] // 2
            return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10

        out = tmp_path / setting
        overrides = tiny_train_overrides(out, updates=2) + [
            f"model.name={name}", "step.scheduler=flow_euler", "train.mixed_precision=bf16",
            "lora.dropout=0.0", "step.guidance_scale=3.0", "train.validation_guidance_scale=3.0",
            "step.reg_weight=0.1", "data.reg_pool_size=2", "train.validate_every=1",
            f"train.precompute_text_embeddings={setting}"]
        train(load_config(ReflConfig, None, overrides), reward_fn=contrast)
        metrics[setting] = read_metrics(out / "metrics.jsonl")
    assert alive_at_reward["null"] and not any(alive_at_reward["null"])
    assert all(alive_at_reward["false"])  # the check sees encoders where they are
    assert metrics["null"] == metrics["false"]  # losses, rewards and eval/reward of the validation images


def test_the_disk_cache_is_keyed_by_content(tmp_path):
    components = load_components("tiny-flux")
    prompts = sorted(PROMPTS)
    computed = load_or_compute(components, prompts, str(tmp_path))
    (path,) = tmp_path.iterdir()
    assert path.name == f"flux-{cache_key(components, prompts)}.safetensors"
    # the same content read back, also from a copy of the model (no path in the key)
    again = load_or_compute(load_components("tiny-flux"), prompts, str(tmp_path))
    assert again.prompts == prompts and torch.equal(again.hidden, computed.hidden)
    assert torch.equal(again.pooled, computed.pooled) and torch.equal(again.text_ids, computed.text_ids)
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["prompts"]) == prompts
    # other weights or another prompt set: another file; nothing half-written is left beside them
    other = load_components(ModelConfig(name="tiny-flux", seed=1))
    assert cache_key(other, prompts) != cache_key(components, prompts)
    assert cache_key(components, prompts[:2]) != cache_key(components, prompts)
    load_or_compute(components, prompts[:2], str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2 and not list(tmp_path.glob(".*"))
    # a truncated file is computed again and replaced
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(load_or_compute(components, prompts, str(tmp_path)).hidden, computed.hidden)
    assert path.stat().st_size > 100


def test_pipeline_embeds_draw_what_the_pipeline_encodes_itself():
    from refl.sampling import make_pipeline, sample

    components = load_components("tiny-sd3")
    kw = {"num_inference_steps": 2, "guidance_scale": 3.0, "output": "pt",
          "generator": torch.Generator().manual_seed(0)}
    live = sample(make_pipeline(components, "flow_euler"), PROMPTS[:3], **kw)
    precompute_text_embeddings(components, PROMPTS)
    kw["generator"] = torch.Generator().manual_seed(0)
    cached = sample(make_pipeline(components, "flow_euler"),
                    embeds=pipeline_embeds(components, PROMPTS[:3], 3.0), **kw)
    torch.testing.assert_close(cached, live, rtol=0, atol=0)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_default_precompute_is_off_when_a_text_encoder_trains(train_text_encoder):
    """Null precompute on a flow model: on, unless a text encoder carries adapters (its embeddings move as it
    trains), where the run keeps encoding live instead of refusing the text-encoder LoRA."""
    components = load_components(ModelConfig(name="tiny-sd3"))
    add_lora(components, LoraConfig(rank=4, alpha=4, train_text_encoder=train_text_encoder))
    assert precompute_wanted(components, None) is (not train_text_encoder)
    assert precompute_wanted(components, True) is True
