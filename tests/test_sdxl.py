"""SDXL end to end on the tiny SDXL preset (real diffusers classes, random weights, offline), the SD 2.x
v-prediction preset, LoRA export for other tools, the model card and the fp16 VAE."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.lora import randomise_lora_b

from refl.components import ModelConfig, build_pipeline, load_components, save_pipeline
from refl.lora import MODEL_CARD, LoraConfig, add_lora, save_lora

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red square on a blue background", "a green circle"]


def run_pipe(pipe, prompts=PROMPTS, guidance_scale=1.0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(list(prompts), num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                guidance_scale=guidance_scale, output_type="np").images


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    save_pipeline(load_components("tiny-sdxl"), path)
    return path


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_dir, tmp_path_factory):
    """A LoRA on the UNet and both text encoders, alpha 16 != rank 4, B randomised; with its tuned images."""
    components = load_components(str(sdxl_dir))
    add_lora(components, LoraConfig(rank=4, alpha=16.0, train_text_encoder=True))
    randomise_lora_b(components)
    path = save_lora(components, tmp_path_factory.mktemp("sdxl_lora") / "lora")
    return {"dir": path, "tuned": run_pipe(build_pipeline(components))}


# ----------------------------------------------------------------------------- components
def test_tiny_sdxl_preset_has_sdxl_layout_and_saves_as_a_stock_sdxl_model(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    c = load_components("tiny-sdxl")
    assert c.is_sdxl and c.image_size == 16
    assert c.unet.config.addition_embed_type == "text_time"
    # The UNet attends to both encoders side by side; the pooled embedding + 6 size numbers feed the time MLP.
    assert (c.unet.config.cross_attention_dim
            == c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size)
    assert c.unet.add_embedding.linear_1.in_features == (c.text_encoder_2.config.projection_dim
                                                         + 6 * c.unet.config.addition_time_embed_dim)
    assert c.unet.config.down_block_types[0] == "DownBlock2D"  # SDXL: no attention at the top level
    # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>.
    assert c.tokenizer("a cat", padding="max_length", max_length=6).input_ids[-1] == 49407
    assert c.tokenizer_2("a cat", padding="max_length",
                         max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]
    # Seeded: the same preset twice gives identical weights, the second encoder included.
    again = load_components("tiny-sdxl")
    assert all(torch.equal(a, b) for a, b in zip(c.text_encoder_2.parameters(),
                                                 again.text_encoder_2.parameters()))

    stock = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    images = run_pipe(stock, guidance_scale=3.0)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    ours = run_pipe(build_pipeline(load_components(str(sdxl_dir))), guidance_scale=3.0)
    assert np.abs(ours - images).max() < 1e-5
    assert load_components(ModelConfig(name=str(sdxl_dir), random_weights=True)).is_sdxl


def test_sdxl_conditioning_on_the_gradient_path_equals_the_stock_pipelines():
    from refl import conditioning

    c = load_components("tiny-sdxl")
    pipe = build_pipeline(c)
    cond = conditioning.encode(c, PROMPTS)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert cond.hidden.shape == (2, 16, 64) and cond.pooled.shape == (2, 32)
    assert torch.equal(cond.hidden, embeds) and torch.equal(cond.pooled, pooled)
    neg = conditioning.negative(c, cond)
    assert torch.equal(neg.hidden, negative) and torch.equal(neg.pooled, negative_pooled)  # zeros, as stock
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                      text_encoder_projection_dim=c.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.time_ids, expected.repeat(2, 1))
    both = conditioning.cat(neg, cond)
    assert len(both) == 4 and torch.equal(both.pooled[2:], cond.pooled)
    sd = load_components("tiny")
    sd_embeds, sd_negative = build_pipeline(sd).encode_prompt(PROMPTS, torch.device("cpu"), 1, True)
    sd_cond = conditioning.encode(sd, PROMPTS)
    assert (torch.equal(sd_cond.hidden, sd_embeds)
            and sd_cond.unet_kwargs().keys() == {"encoder_hidden_states"})
    assert torch.equal(conditioning.negative(sd, sd_cond).hidden, sd_negative)


def test_an_sdxl_model_that_encodes_the_empty_negative_prompt_is_trained_and_sampled_as_it_says(sdxl_dir,
                                                                                              tmp_path):
    """force_zeros_for_empty_prompt off in model_index.json: the gradient path's negative is the encoded ""
    (what the stock pipeline loaded from that folder draws with); pipelines built or saved here keep it."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    from refl import conditioning

    assert load_components(str(sdxl_dir)).force_zeros_for_empty_prompt  # SDXL base's setting, saved
    model = tmp_path / "encodes-empty"
    shutil.copytree(sdxl_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))

    random_weights = ModelConfig(name=str(model), random_weights=True)
    assert not any(c.force_zeros_for_empty_prompt
                   for c in (load_components(str(model)), load_components(random_weights)))
    c = load_components(str(model))
    stock = StableDiffusionXLPipeline.from_pretrained(model)
    _, negative, _, negative_pooled = stock.encode_prompt(
        prompt=PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True)
    neg = conditioning.negative(c, conditioning.encode(c, PROMPTS))
    assert negative.abs().sum() > 0  # not zeros
    assert torch.equal(neg.hidden, negative) and torch.equal(neg.pooled, negative_pooled)
    ours = build_pipeline(c)
    assert ours.config.force_zeros_for_empty_prompt is False
    assert np.abs(run_pipe(ours, guidance_scale=3.0) - run_pipe(stock, guidance_scale=3.0)).max() < 1e-5
    saved = save_pipeline(c, tmp_path / "saved")
    assert json.loads((saved / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False


def test_v_prediction_preset():
    v = load_components("tiny-v")
    assert v.scheduler.config.prediction_type == "v_prediction"
    assert v.unet.config.use_linear_projection and not v.is_sdxl
    assert load_components("tiny").scheduler.config.prediction_type == "epsilon"


# ----------------------------------------------------------------------------- LoRA
def test_sdxl_lora_round_trip_is_exact_in_the_stock_pipeline(sdxl_dir, sdxl_lora):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(sdxl_lora["dir"] / "pytorch_lora_weights.safetensors"), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    assert modules == {"unet", "text_encoder", "text_encoder_2"}
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    base = run_pipe(stock)
    stock.load_lora_weights(sdxl_lora["dir"])
    reloaded = run_pipe(stock)
    assert np.abs(sdxl_lora["tuned"] - base).max() > 1e-2  # the LoRA changes the images
    assert np.abs(sdxl_lora["tuned"] - reloaded).max() < 1e-5  # alpha 16 != rank 4 reloads at its scale


# ----------------------------------------------------------------------------- kohya export
@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_kohya_export_loads_back_through_diffusers_kohya_loader_with_the_same_images(preset, tmp_path):

    from safetensors import safe_open

    components = load_components(preset)
    save_pipeline(components, tmp_path / "base")
    add_lora(components, LoraConfig(rank=4, alpha=16.0, train_text_encoder=True))
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    tuned = run_pipe(build_pipeline(components))

    from refl.cli import export_main

    out = tmp_path / "mine.safetensors"
    assert export_main([str(tmp_path / "lora"), "--layout", "kohya", "--output-file", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    # SD 1.x's one text encoder is lora_te_, as sd-scripts names it (it matches no lora_te1_ module there)
    text = "lora_te1" if preset == "tiny-sdxl" else "lora_te"
    assert prefixes == ({"lora_unet", "lora_te1", "lora_te2"} if preset == "tiny-sdxl"
                        else {"lora_unet", "lora_te"})
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert any(k.startswith(f"{text}_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert alphas == {16.0}  # the trained alpha, not diffusers' converter's alpha = rank

    stock = build_pipeline(load_components(str(tmp_path / "base")))
    stock.load_lora_weights(str(out))  # a kohya file: diffusers converts it with its own kohya loader
    assert np.abs(run_pipe(stock) - tuned).max() < 1e-5


# How each tool's LoRA loader maps a kohya file's UNet key onto the original (LDM / SGM) UNet's module, as
# read in its source (docs/refl.md names the files and lines); written here from those readings. A module
# name is spelled with "_" for ".", as every kohya key is.
_ATTENTION_LEAVES = [f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")]


def _a1111_module(key: str) -> str:
    """AUTOMATIC1111: diffusers' block names by arithmetic on the block numbers (three sub-blocks per level),
    any other lora_unet_ key taken as an original name already."""
    import re

    name = key.removeprefix("lora_unet_")
    if m := re.fullmatch(r"down_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"input_blocks_{1 + 3 * int(m[1]) + int(m[2])}_1_{m[3]}"
    if m := re.fullmatch(r"mid_block_attentions_0_(.+)", name):
        return f"middle_block_1_{m[1]}"
    if m := re.fullmatch(r"up_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"output_blocks_{3 * int(m[1]) + int(m[2])}_1_{m[3]}"
    return name


def _comfy_forge_modules(config: dict) -> dict[str, str]:
    """ComfyUI and Forge (which ships ComfyUI's loader): a table of every attention projection of the
    original UNet, reached by its original name and by its diffusers name, built from the model's own layout
    (blocks per level, transformer depth of each level)."""
    per_level, levels = config["layers_per_block"], len(config["down_block_types"])
    depth = config.get("transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    attends = ["CrossAttn" in t for t in config["down_block_types"]]
    table = {}

    def add(diffusers: str, original: str, layers: int) -> None:
        for t in range(layers):
            for leaf in _ATTENTION_LEAVES:
                sub = f"transformer_blocks_{t}_{leaf}"
                table[f"lora_unet_{diffusers}_{sub}"] = f"{original}_{sub}"
                table[f"lora_unet_{original}_{sub}"] = f"{original}_{sub}"

    step = per_level + 1  # a level's sub-blocks: its resnets and a down- or upsampler
    for x in range(levels):
        for i in range(per_level):
            if attends[x]:
                add(f"down_blocks_{x}_attentions_{i}", f"input_blocks_{1 + step * x + i}_1", depth[x])
    add("mid_block_attentions_0", "middle_block_1", depth[-1])
    for x, level in enumerate(reversed(range(levels))):
        for i in range(step):
            if attends[level]:
                add(f"up_blocks_{x}_attentions_{i}", f"output_blocks_{step * x + i}_1", depth[level])
    return table


def _sd_scripts_module(key: str, sdxl: bool) -> str:
    """kohya sd-scripts: its SD 1.x UNet has diffusers' names; for SDXL a diffusers-named key's block prefix
    is replaced by the original one from its SDXL conversion table (three sub-blocks per level)."""
    import re

    name = key.removeprefix("lora_unet_")
    if not sdxl:
        return name
    table = ((r"down_blocks_(\d+)_attentions_(\d+)_", lambda i, j: f"input_blocks_{3 * i + j + 1}_1_"),
             (r"up_blocks_(\d+)_attentions_(\d+)_", lambda i, j: f"output_blocks_{3 * i + j}_1_"),
             (r"mid_block_attentions_0_", lambda: "middle_block_1_"))
    for pattern, original in table:
        if m := re.match(pattern, name):
            return original(*map(int, m.groups())) + name[m.end():]
    return name


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_export_keys_land_on_every_attention_module_in_each_tools_loader(family, tmp_path):
    """Every UNet key of an export of a full-size SD 1.5 / SDXL LoRA (the shipped configs, no weights) lands
    on its own attention projection of the original UNet in AUTOMATIC1111's, ComfyUI / Forge's and
    sd-scripts' key handling, all on the same one; and diffusers' own reading of original names brings each
    back to the key written. Text-encoder keys carry the prefixes those tools read."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers
    from safetensors.torch import save_file

    from refl.export import kohya_state_dict
    from refl.lora import DEFAULT_TARGETS, LORA_WEIGHTS

    shipped = Path(__file__).parents[1] / "refl" / "model_configs" / family / "unet.json"
    config = json.loads(shipped.read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    targets = tuple("." + t for t in DEFAULT_TARGETS["sd"])
    modules = [name for name, _ in unet.named_modules() if name.endswith(targets)]
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    tensors = {f"unet.{m}.lora_{ab}.weight": torch.zeros(1, 1) for m in modules for ab in "AB"}
    tensors |= {f"{e}.text_model.encoder.layers.0.self_attn.q_proj.lora_{ab}.weight": torch.zeros(1, 1)
                for e in encoders for ab in "AB"}
    (tmp_path / "lora").mkdir()
    metadata = {"lora_adapter_metadata": json.dumps({f"{m}.lora_alpha": 1 for m in ["unet", *encoders]})}
    save_file(tensors, tmp_path / "lora" / LORA_WEIGHTS, metadata=metadata)
    state, _ = kohya_state_dict(tmp_path / "lora")

    names = sorted({k.split(".")[0] for k in state if k.startswith("lora_unet_")})
    # transformer blocks x 2 attentions x 4 projections: SDXL 70 blocks, SD 1.5 16
    assert len(names) == len(modules) == (70 if family == "sdxl" else 16) * 2 * 4
    comfy = _comfy_forge_modules(config)
    landed = {"a1111": [_a1111_module(k) for k in names], "comfy": [comfy.get(k) for k in names],
              "sd-scripts": [_sd_scripts_module(k, family == "sdxl") for k in names]}
    if family == "sdxl":
        assert landed["a1111"] == landed["comfy"] == landed["sd-scripts"]
    else:  # sd-scripts' SD 1.x UNet is named as diffusers names it
        assert landed["a1111"] == landed["comfy"] and landed["sd-scripts"] == [k[10:] for k in names]
    assert set(landed["comfy"]) <= set(comfy.values()) and len(set(landed["comfy"])) == len(names)
    # diffusers renumbers original names into its blocks, then renames the block kinds
    sgm = {f"lora_unet_{m}.lora_down.weight": None for m in landed["comfy"]}
    layout = SimpleNamespace(layers_per_block=config["layers_per_block"])
    back = _maybe_map_sgm_blocks_to_diffusers(sgm, layout)
    renamed = [k.split(".")[0] for k in back]
    for original, block in {"input_blocks": "down_blocks", "middle_block": "mid_block",
                            "output_blocks": "up_blocks"}.items():
        renamed = [k.replace(original, block) for k in renamed]
    assert sorted(renamed) == names

    text = {k.split("_text_model")[0] for k in state if not k.startswith("lora_unet_")}
    assert text == ({"lora_te1", "lora_te2"} if family == "sdxl" else {"lora_te"})
    assert all("_text_model_encoder_layers_0_self_attn_q_proj." in k for k in state
               if k.startswith("lora_te"))


def test_export_refuses_a_folder_without_weights(tmp_path, capsys):
    from refl.cli import export_main

    (tmp_path / "empty").mkdir()
    assert export_main([str(tmp_path / "empty")]) == 2
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- generate and the harness
def test_generate_with_an_sdxl_lora_draws_what_the_stock_sdxl_pipeline_draws(sdxl_dir, sdxl_lora, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from test_generate import generate_equals_stock_pipeline

    generate_equals_stock_pipeline(sdxl_dir, sdxl_lora["dir"], StableDiffusionXLPipeline, tmp_path)


def test_generate_script_with_an_sdxl_lora(sdxl_dir, sdxl_lora, tmp_path):
    from PIL import Image

    from refl.cli import generate_main

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--model", str(sdxl_dir), "--prompts-file", str(tmp_path / "prompts.txt"), "--images-per-prompt",
            "1", "--seed", "0",
            "--num-inference-steps", "3", "--guidance-scale", "1", "--device", "cpu"]
    assert generate_main([*args, "--lora", str(sdxl_lora["dir"]), "--out", str(tmp_path / "tuned")]) == 0
    assert generate_main([*args, "--out", str(tmp_path / "base")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tuned" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    tuned = [np.asarray(Image.open(tmp_path / "tuned" / r["file"])).astype(int) for r in rows]
    base = [np.asarray(Image.open(tmp_path / "base" / r["file"])).astype(int) for r in rows]
    assert tuned[0].shape == (16, 16, 3)
    assert max(np.abs(t - b).max() for t, b in zip(tuned, base)) > 10  # the LoRA was applied


def test_harness_with_an_sdxl_lora_draws_what_the_stock_pipeline_draws(sdxl_dir, sdxl_lora, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from evaluation import harness as H
    from evaluation.config import CompareConfig
    from evaluation.layout import samples_path
    from refl.sampling import seed_generators
    from runkit.config import load_config

    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    cfg = load_config(CompareConfig, None, [
        f"model.name={sdxl_dir}", f"lora={sdxl_lora['dir']}", f"prompts_file={tmp_path / 'prompts.txt'}",
        "n_samples=2",
        "batch_size=2", "num_inference_steps=3", "guidance_scale=3.0", "critic=tiny-clip",
        "bootstrap_resamples=50", "throughput_repeats=1", f"output_dir={tmp_path / 'run'}"])
    results = H.run_compare(cfg)
    assert {"base_random", "refl_random", "base_best_of_2"} <= set(results["arms"])
    base = np.load(samples_path(tmp_path / "run", "base", 0))
    refl = np.load(samples_path(tmp_path / "run", "refl", 0))
    # The harness encodes each prompt once and passes pooled embeddings along: the same images as a plain
    # stock StableDiffusionXLPipeline call with the same per-image seeds (its empty negative prompt: zeros).
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    # the harness's sampler (cfg.scheduler)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    expected = stock([PROMPTS[0]] * 2, num_inference_steps=3, guidance_scale=3.0, output_type="np",
                     generator=seed_generators(base["seeds"])).images
    assert np.abs(base["images"].astype(int) - (expected * 255).round().astype(int)).max() <= 1
    assert np.abs(refl["images"].astype(int) - base["images"].astype(int)).max() > 10
    assert json.loads((tmp_path / "run" / "throughput.json").read_text())["result"]["ratio_vs_stock"] > 0


# ----------------------------------------------------------------------------- model card
def test_every_saved_lora_folder_has_a_model_card(tmp_path):
    from refl.cli import train_main
    from runkit.logs import read_metrics

    args = ["--set", f"train.output_dir={tmp_path}", "--set", "model.name=tiny", "--set",
            "reward.kind=contrast",
            "--set", "train.max_updates=2", "--set", "train.batch_size=1", "--set",
            "train.gradient_accumulation=1",
            "--set", "train.lr=3e-3", "--set", "train.checkpoint_every=1", "--set", "train.validate_every=1",
            "--set", "train.log_with=none", "--set", "train.validation_num_inference_steps=2", "--set",
            "step.num_inference_steps=3",
            "--set", "step.cut_range=[1,2]", "--set", "train.validation_prompts=[a cat]",
            "--set", "train.select_by=clip:tiny-clip"]
    assert train_main(args) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["update"] for r in evals] == [0, 1, 2]  # update 0: the base model (train.validate_at_start)
    final = (tmp_path / "lora" / MODEL_CARD).read_text()
    assert final.startswith("---\nbase_model: tiny\n")
    assert "| method | `refl`, 3 `ddim` steps" in final and "| updates | 2 of 2 |" in final
    assert "| learning rate | 0.003 " in final and "| reward | `contrast` |" in final
    assert "social-refl-train-refl --set" in final and "train.select_by=clip:tiny-clip" in final
    rewards = [r["eval/reward"] for r in evals]
    best = int(np.argmax(rewards))
    assert (f"| `eval/reward` | {rewards[-1]:.4g} | 2 | "
            f"{rewards[best]:.4g} | {evals[best]['update']} |") in final
    assert "`eval/heldout/clip:tiny-clip`" in final
    # A checkpoint's card describes that checkpoint, which is written before its update's validation.
    first = (tmp_path / "checkpoints" / "update-000001" / "lora" / MODEL_CARD).read_text()
    assert "| updates | 1 of 2 |" in first and f"| `eval/reward` | {rewards[0]:.4g} | 0 |" in first
    second = (tmp_path / "checkpoints" / "update-000002" / "lora" / MODEL_CARD).read_text()
    assert "| updates | 2 of 2 |" in second and f"| `eval/reward` | {rewards[1]:.4g} | 1 |" in second
    assert (tmp_path / "lora_best" / MODEL_CARD).is_file()


# ----------------------------------------------------------------------------- fp16 and the VAE
def _overflowing_vae(vae):
    """SDXL's VAE problem in miniature: its decoder's activations pass fp16's 65504. Scaling the decoder's
    first convolution by 1e5 does that here; fp32 still decodes finitely (GroupNorm rescales what follows),
    fp16 turns the activations into inf and NaN. (Random weights never overflow by themselves.)"""
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    return vae


def test_fp16_keeps_an_unsafe_vae_in_fp32_and_a_named_fp16_safe_vae_decodes_without_nans(tmp_path):
    import copy

    from refl.sampling import make_pipeline, sample

    safe = load_components("tiny-sdxl").vae
    safe.register_to_config(force_upcast=False)  # how an fp16-safe VAE marks itself
    safe.save_pretrained(tmp_path / "safe-vae")
    # the same latents throughout
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    unsafe = load_components("tiny-sdxl")
    _overflowing_vae(unsafe.vae)
    with torch.no_grad():
        fp32 = unsafe.vae.decode(latents).sample
        naive_fp16 = copy.deepcopy(unsafe.vae).half().decode(latents.half()).sample
    assert torch.isfinite(fp32).all() and not torch.isfinite(naive_fp16).all()  # the overflow is real

    unsafe.to(dtype=torch.float16)  # the base in fp16; this VAE is not marked fp16-safe, so it stays fp32
    assert unsafe.unet.dtype == torch.float16 and unsafe.vae.dtype == torch.float32
    with unsafe.autocast():
        images = sample(make_pipeline(unsafe), ["a cat"], seeds=[0], num_inference_steps=2, output="pt")
    assert torch.isfinite(images).all()  # the pipeline's latents, decoded outside fp16 autocast

    named = load_components(ModelConfig(name="tiny-sdxl", vae=str(tmp_path / "safe-vae")))  # model.vae
    named.to(dtype=torch.float16)
    assert named.vae.dtype == torch.float16  # fp16-safe: it runs in fp16 like the rest
    with torch.no_grad():
        half = named.vae.decode(latents.half()).sample
        reference = safe.decode(latents).sample
    assert torch.isfinite(half).all() and (half.float() - reference).abs().max() < 2e-2


# --------------------------------------------------------------------------- ReFL on SDXL and on v-prediction
def _left_right_contrast(images, prompts):
    """A reward a random-weight VAE passes on: (left half - right half brightness) * 10, (B,)."""
    w = images.shape[-1] // 2
    return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10


@pytest.mark.parametrize("method", ["refl", "draft", "draft_lv", "alignprop"])
def test_sdxl_refl_in_bf16_with_guidance_regulariser_kl_validation_and_text_encoder_lora(tmp_path, method):
    from diffusers import StableDiffusionXLPipeline

    from refl.step import GRAD_METHODS
    from refl.train import ReflConfig, train
    from runkit.config import load_config

    assert method in GRAD_METHODS
    cfg = load_config(ReflConfig, None, [
        f"train.output_dir={tmp_path}", "model.name=tiny-sdxl", "reward.kind=critic",
        "reward.critic=tiny-clip",
        "train.mixed_precision=bf16", "train.max_updates=2", "train.batch_size=2",
        "train.gradient_accumulation=1",
        "train.lr=1e-2", "train.checkpoint_every=2", "train.validate_every=2",
        "train.validation_num_inference_steps=2",
        "train.validation_prompts=[a cat]", "train.log_with=none", f"step.method={method}",
        "step.num_inference_steps=3",
        "step.scheduler=ddpm", "step.guidance_scale=2.0", "step.reg_weight=1.0", "step.kl_weight=1.0",
        "data.reg_pool_size=2", "lora.train_text_encoder=true", "step.grad_scale=1.0"]
        + (["step.cut_range=[1,2]"] if method in ("refl", "alignprop") else []))
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2 and all(np.isfinite(r["train/loss"]) and r["train/kl_loss"] >= 0
                                        and np.isfinite(r["train/reg_loss"]) for r in train_rows)
    assert np.isfinite([r["eval/reward"] for r in rows if "eval/reward" in r]).all()
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for module in ("unet", "text_encoder", "text_encoder_2"):  # the gradient reached every adapted module
        ups = [v for k, v in saved.items() if k.startswith(module + ".") and (".up." in k or "lora_B" in k)]
        assert ups and any(v.abs().sum() > 0 for v in ups), module
    assert "stable-diffusion-xl" in (tmp_path / "lora" / MODEL_CARD).read_text()
    pipe = StableDiffusionXLPipeline(
        **{k: v for k, v in build_pipeline(load_components("tiny-sdxl")).components.items()})
    pipe.load_lora_weights(result["lora"])  # what training saved loads in the stock SDXL pipeline
    assert np.isfinite(run_pipe(pipe)).all()


def test_v_prediction_refl_takes_x0_from_v_and_learns():
    from refl import step as step_module
    from refl.sampling import make_pipeline, make_scheduler, sample
    from refl.step import StepConfig, reward_step

    components = load_components("tiny-v")
    add_lora(components, LoraConfig(rank=4, alpha=4.0))
    randomise_lora_b(components)
    cfg = StepConfig(method="refl", num_inference_steps=4, cut_range=[2, 2], reward_margin=2.0)
    calls, decoded = [], []
    hook = components.unet.register_forward_hook(lambda m, args,
                                                 out: calls.append((args[0], args[1], out.sample)))
    real_decode = step_module.decode
    step_module.decode = lambda c, x0: decoded.append(x0) or real_decode(c, x0)
    try:
        reward_step(components, PROMPTS, _left_right_contrast, cfg, torch.Generator().manual_seed(0))
    finally:
        step_module.decode = real_decode
        hook.remove()
    x_t, t, v = calls[-1]  # the call with gradient: DDIM's model input is the latent itself
    scheduler = make_scheduler("ddim", components)
    scheduler.set_timesteps(4)
    assert int(t) == int(scheduler.timesteps[2])
    a = scheduler.alphas_cumprod[int(t)]
    from_v = a.sqrt() * x_t - (1 - a).sqrt() * v
    from_eps = (x_t - (1 - a).sqrt() * v) / a.sqrt()  # what an epsilon reading would give
    assert (torch.allclose(decoded[0], from_v, atol=1e-5)
            and not torch.allclose(decoded[0], from_eps, atol=1e-2))

    def held_out_score():  # fresh samples (fixed seed), not the training trajectories
        images = sample(make_pipeline(components), PROMPTS, num_inference_steps=4, output="pt",
                        generator=torch.Generator().manual_seed(123))  # (B, 3, H, W)
        return _left_right_contrast(images, PROMPTS).mean().item()

    components = load_components("tiny-v")  # learning starts from the identity LoRA, as training does
    params = add_lora(components, LoraConfig(rank=4, alpha=4.0))
    start = held_out_score()
    # lr 1e-2: at 1e-1 Adam overshoots and the score wanders (+0.09 after 40 updates on one Xeon, +0.01 after
    # 80), at 1e-2 it rises at every tenth update (0.21 -> 0.35, 0.34, 0.41, 0.46).
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    cfg = StepConfig(method="refl", num_inference_steps=4, cut_range=[1, 3], reward_margin=2.0)
    for i in range(40):
        reward_step(components, PROMPTS, _left_right_contrast, cfg,
                    torch.Generator().manual_seed(i))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = held_out_score()
    assert end > start + 0.1, (start, end)
