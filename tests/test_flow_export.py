"""The export of SD 3 / FLUX LoRAs (refl/export.py): the diffusers layout with alpha / rank folded into
lora_B, which ComfyUI (SD 3, FLUX) and Forge (FLUX) map by its `transformer.` keys and which diffusers' own
loader reads back into the same images; a UNet LoRA still goes out in the kohya layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.lora import randomise_lora_b

from refl.components import load_components, pipeline_class, save_pipeline
from refl.lora import LoraConfig, add_lora, save_lora
from refl.sampling import make_pipeline, sample

torch.set_num_threads(1)

PROMPTS = ["a red cat", "a blue square"]
KW = {"num_inference_steps": 3, "guidance_scale": 3.0, "output": "pt"}
# The diffusers module names ComfyUI's tables map LoRA keys `transformer.<name>` from (comfy.utils'
# mmdit_to_diffusers for SD 3's joint blocks, flux_to_diffusers for FLUX's joint and single blocks), as
# suffixes after the block index: every module the export writes must be one of them.
COMFYUI_MAPPED = {
    "sd3": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
            "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
            "ff_context.net.2"],
    "flux": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2", "proj_mlp", "proj_out"],
}


# ComfyUI's key for a CLIP text encoder's LoRA module (model_lora_keys_clip): SD 3's CLIP-L and CLIP-G,
# FLUX's CLIP-L, with CLIP's text_model level.
COMFYUI_CLIP = re.compile(r"(text_encoder|text_encoder_2)\.text_model\.encoder\.layers\.\d+\."
                          r"(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)")


@pytest.mark.parametrize("text_lora", [False, True], ids=["transformer", "with-text-encoders"])
@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flow_export_loads_back_through_diffusers_with_the_same_images(name, text_lora, tmp_path, capsys):
    from safetensors import safe_open

    from refl.cli import export_main

    components = load_components(name)
    save_pipeline(components, tmp_path / "base")
    # alpha != rank: the scale must survive
    add_lora(components, LoraConfig(rank=4, alpha=16.0, train_text_encoder=text_lora))
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    tuned = sample(make_pipeline(components, "flow_euler"), PROMPTS, seeds=[0, 1], **KW)

    out = tmp_path / "mine.safetensors"
    assert export_main([str(tmp_path / "lora"), "--output-file", str(out)]) == 0  # the layout for its model
    assert json.loads(capsys.readouterr().out)["layout"] == "diffusers"
    with safe_open(str(out), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
        assert "lora_adapter_metadata" not in (f.metadata() or {})  # the loaders would read it, or refuse it
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in exported)  # alpha is in lora_B
    text = {k.rsplit(".lora_", 1)[0] for k in exported if not k.startswith("transformer.")}
    assert bool(text) == text_lora and all(COMFYUI_CLIP.fullmatch(m) for m in text), sorted(text)[:3]
    modules = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in exported
               if k.startswith("transformer.")}
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    mapped = COMFYUI_MAPPED[components.family]
    assert all(m.startswith(blocks) and m.split(".", 2)[2] in mapped for m in modules)
    # What a loader that applies B A at alpha = rank (ComfyUI and Forge without an alpha tensor, diffusers
    # without adapter metadata) adds to each weight is the trained update
    transformer = components.transformer
    for m in modules:
        layer = transformer.get_submodule(m)
        update = exported[f"transformer.{m}.lora_B.weight"] @ exported[f"transformer.{m}.lora_A.weight"]
        torch.testing.assert_close(update, layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)

    stock = pipeline_class(components.family).from_pretrained(tmp_path / "base")
    stock.set_progress_bar_config(disable=True)
    base = sample(stock, PROMPTS, seeds=[0, 1], **KW)
    stock.load_lora_weights(str(out))  # the exported file itself, through the family's own loader
    assert (tuned - base).abs().max() > 1e-2
    assert (sample(stock, PROMPTS, seeds=[0, 1], **KW) - tuned).abs().max() < 1e-5

    from refl.export import export_lora

    with pytest.raises(ValueError, match="layout=diffusers"):
        export_lora(tmp_path / "lora", "kohya", tmp_path / "kohya.safetensors")


def test_a_unet_lora_exports_to_kohya_by_default_and_refuses_the_diffusers_layout(base_dir, tmp_path):
    from refl.export import export_lora, layout_for

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=2, alpha=4.0))
    save_lora(components, tmp_path / "lora")
    assert layout_for(tmp_path / "lora") == "kohya"
    assert export_lora(tmp_path / "lora").name == "lora_kohya.safetensors"
    with pytest.raises(ValueError, match="layout=kohya"):
        export_lora(tmp_path / "lora", "diffusers")
