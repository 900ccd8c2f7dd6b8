"""The memory model on the meta device (benchmarks/meta_device.py, memory_model's `device: meta`): an update
counted there stores what the same update run on the CPU stores (tiny-sd3, tiny-flux, bf16, with and without
checkpointing), views allocate nothing, the few read-back values are the true ones, and the model runs end to
end on a flow preset with the transformer's checkpointing as training uses it."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_model import BroadcastBmmAsMm, CudaAutocastNorms, MemoryModelConfig, memory_model
from benchmarks.meta_device import CudaAutocastOnMeta, MetaValues
from refl.components import Checkpointing, build_flow_preset
from refl.counting import TensorMemory, count
from refl.lora import LoraConfig, add_lora
from refl.step import StepConfig, checkpointing_for, reward_step
from refl.text_embeddings import precompute_text_embeddings

torch.set_num_threads(1)


def _bench(name, device):
    with torch.device(device):
        components = build_flow_preset(name)
    components.to(device, torch.bfloat16)
    params = add_lora(components, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():
        for p in params[1::2]:
            p.normal_(0.0, 1e-3)
    optimizer = torch.optim.AdamW(params, lr=1e-9)
    for p in params:
        p.grad = torch.zeros_like(p)
    values = MetaValues()
    with values:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return components, optimizer, values


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_an_update_on_meta_stores_what_it_stores_on_the_cpu(name):
    prompts = ["a cat", "a dog"]
    cfg = StepConfig(method="refl", scheduler="flow_euler", num_inference_steps=4, cut_range=[3, 3],
                     guidance_scale=3.0)
    counts = {}
    for device in ("cpu", "meta"):
        components, optimizer, values = _bench(name, device)
        components.set_image_size(32)
        modes = ((values, CudaAutocastOnMeta()) if device == "meta"
                 else (BroadcastBmmAsMm(), CudaAutocastNorms()))
        with values, CudaAutocastOnMeta():
            precompute_text_embeddings(components, prompts)

        def update(timer, components=components, optimizer=optimizer):
            out = reward_step(components, prompts, lambda images, p: images.mean(dim=(1, 2, 3)), cfg,
                              torch.Generator().manual_seed(0), timer=timer)
            torch.autograd.backward(out["loss"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for unit in ("none", "blocks", "calls"):
            components.set_gradient_checkpointing(Checkpointing(unet=unit, vae_decoder=unit != "none"))
            counts[device, unit] = count(update, {"unet": components.transformer}, torch.device(device),
                                         modes=modes)
        if device == "meta":
            assert values.assumed_true == 3  # the finite-loss check of each update, nothing else unknown
    for unit in ("none", "blocks", "calls"):
        cpu, meta = counts["cpu", unit], counts["meta", unit]
        assert meta["flops"] == cpu["flops"] and meta["forward_flops"] == cpu["forward_flops"]
        assert meta["peak_tensor_bytes"] == pytest.approx(cpu["peak_tensor_bytes"], rel=2e-3), unit
    assert counts["meta", "blocks"]["peak_tensor_bytes"] < counts["meta", "none"]["peak_tensor_bytes"]


def test_views_and_in_place_ops_allocate_nothing():
    for device in ("cpu", "meta"):
        linear = torch.nn.Linear(256, 256, device=device, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(2, 256, device=device, dtype=torch.bfloat16)
        memory = TensorMemory()
        with memory:
            y = linear(x)  # the weight's transpose is a view: only y (1 KiB) is new
            y.view(-1).add_(1)
            both = torch.cat([y, y])  # 2 KiB
        assert memory.peak == y.numel() * 2 + both.numel() * 2, device


def test_meta_values_give_the_schedule_index_and_item():
    from refl.components import load_components
    from refl.sampling import make_scheduler
    from refl.step.blocks import flow_sigma, set_timesteps

    cpu = load_components("tiny-flux")
    scheduler = make_scheduler("flow_euler", cpu)
    set_timesteps(cpu, scheduler, 6)
    with torch.device("meta"):
        meta = build_flow_preset("tiny-flux")
    meta.to("meta")
    values = MetaValues()
    with values:
        on_meta = make_scheduler("flow_euler", meta)
        set_timesteps(meta, on_meta, 6)
        sigma, sigma_next = flow_sigma(on_meta, on_meta.timesteps[3])
        assert on_meta.timesteps.is_meta
        assert float(sigma) == float(scheduler.sigmas[3]) and float(sigma_next) == float(scheduler.sigmas[4])


def test_the_meta_memory_model_runs_on_a_flow_preset():
    # refl, and draft_lv, whose re-noising reads the schedule on the meta device too
    methods = ["refl", "draft_lv"]
    cfg = MemoryModelConfig(model="tiny-flux", critic="tiny-clip", device="meta", target_px=32,
                            batch_sizes=[1, 2], methods=methods,
                            step=StepConfig(scheduler="flow_euler", num_inference_steps=4, cut_range=[2, 3],
                                            guidance_scale=3.5))
    model = memory_model(cfg)
    assert model["family"] == "flux" and model["measured_on"]["counted_on"] == "meta"
    assert list(model["methods"]) == methods
    assert set(model["text_encoders_freed_gib"]) == {"text_encoder", "text_encoder_2"}
    assert model["unknown_reads_assumed_true"] == 2 * 3 * len(methods)  # one per counted update
    for method, entry in model["methods"].items():
        # bold in the table: what train.gradient_checkpointing means for FLUX
        assert entry["default"] == checkpointing_for(method, True, "flux").unet == "blocks"
        for name, row in entry["settings"].items():
            assert row["peak_gib"]["2"] > row["peak_gib"]["1"] > 0
            ratio = row["recompute_ratio_denoiser"]
            assert ratio == 1.0 if name == "none" else 1.9 < ratio <= 2.0  # each forward rerun once
    assert "**transformer blocks" in model["table_markdown"]


@pytest.mark.slow  # 1-2 min each on a shared 2-core CPU; the committed SD 3.5 medium check is the full one
@pytest.mark.parametrize("name,blocks", [("tiny-flux", {"layers": 4, "single_layers": 4}),
                                         ("tiny-sd3", {"layers": 5})])
def test_depth_extrapolation_gives_the_full_count(monkeypatch, name, blocks):
    """Counting 3 and 4 blocks of each kind at batch 1 and 2 and extrapolating gives what counting the deeper
    transformer at every batch gives: every phase grows by the same bytes per block and per image."""
    from dataclasses import replace

    from refl.components import FLOW_PRESETS

    monkeypatch.setitem(FLOW_PRESETS, "deep", replace(FLOW_PRESETS[name], **blocks))
    cfg = MemoryModelConfig(model="deep", critic="tiny-clip", device="meta", target_px=32, batch_sizes=[1, 3],
                            methods=["refl"],
                            step=StepConfig(scheduler="flow_euler", num_inference_steps=4, cut_range=[2, 3],
                                            guidance_scale=3.0))
    exact = memory_model(cfg)["methods"]["refl"]["settings"]
    extrapolated = memory_model(replace(cfg, extrapolate_depth=True))["methods"]["refl"]["settings"]
    for setting, row in exact.items():
        other = extrapolated[setting]
        assert other["peak_at"] == row["peak_at"]
        for batch in ("1", "3"):
            assert other["peak_gib"][batch] == pytest.approx(row["peak_gib"][batch], rel=1e-9), setting
            assert other["seconds_per_update"][batch] == pytest.approx(row["seconds_per_update"][batch],
                                                                       rel=1e-9)
