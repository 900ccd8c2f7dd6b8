"""refl.generate and social-refl-generate: images with a LoRA, one seed per image whatever the batch, bf16."""

from __future__ import annotations

import json

import numpy as np
import torch
import yaml
from helpers.lora import randomise_lora_b

from refl.components import load_components
from refl.lora import LoraConfig, add_lora, save_lora

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting (100x slower).
torch.set_num_threads(1)


def test_generate_script_writes_pngs_and_jsonl(base_dir, tmp_path):

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=2, alpha=8.0))
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    from refl.cli import generate_main

    assert generate_main(["--model", str(base_dir), "--lora", str(tmp_path / "lora"), "--prompts-file",
                        str(tmp_path / "prompts.txt"), "--images-per-prompt", "2", "--seed", "3",
                        "--num-inference-steps", "2", "--critic",
                        "toy-clip", "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a cat", 3), ("a cat", 4), ("a dog", 3),
                                                        ("a dog", 4)]
    assert all((tmp_path / "gen" / r["file"]).is_file() and isinstance(r["critic_score"], float)
               for r in rows)
    saved = yaml.safe_load((tmp_path / "gen" / "config.yaml").read_text())  # the resolved config, beside them
    assert saved["images_per_prompt"] == 2 and saved["lora"] == str(tmp_path / "lora") and saved["seed"] == 3


def test_batched_generation_keeps_per_image_seeds(base_dir, tmp_path, monkeypatch):
    from PIL import Image

    from refl.generate import generate, load_pipeline

    pipe = load_pipeline(str(base_dir), device="cpu")
    calls = []
    original = type(pipe).__call__

    def counting(self, prompt, *args, **kwargs):
        calls.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    prompts = ["a cat", "a dog"]
    one = generate(pipe, prompts, tmp_path / "one", n=3, seed=5, num_inference_steps=2, batch_size=1)
    four = generate(pipe, prompts, tmp_path / "four", n=3, seed=5, num_inference_steps=2, batch_size=4)
    assert calls == [1] * 6 + [4, 2]
    assert [(r["prompt"], r["seed"]) for r in four] == [(r["prompt"], r["seed"]) for r in one]
    for r in one:
        a = np.asarray(Image.open(tmp_path / "one" / r["file"])).astype(int)
        b = np.asarray(Image.open(tmp_path / "four" / r["file"])).astype(int)
        assert np.abs(a - b).max() <= 1  # batched kernels differ in the last bits only
    first = np.asarray(Image.open(tmp_path / "one" / one[0]["file"])).astype(int)
    other_seed = np.asarray(Image.open(tmp_path / "one" / one[1]["file"])).astype(int)
    assert np.abs(first - other_seed).max() > 10  # the per-image seed matters


def test_bf16_generation_with_a_lora(base_dir, tmp_path):
    from refl.generate import generate, load_pipeline

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=2, alpha=4.0))
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    pipe = load_pipeline(str(base_dir), lora=str(tmp_path / "lora"), device="cpu", mixed_precision="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    rows = generate(pipe, ["a cat"], tmp_path / "gen", n=2, seed=0, num_inference_steps=2, batch_size=2)
    assert len(rows) == 2 and all((tmp_path / "gen" / r["file"]).is_file() for r in rows)


def generate_equals_stock_pipeline(model_dir, lora_dir, pipeline_cls, tmp_path):
    """`social-refl-generate` with a LoRA draws what `pipeline_cls.from_pretrained(model_dir)` plus
    `load_lora_weights(lora_dir)` draws, with the sampler the model ships (made Euler here: the default
    scheduler of both families' stock pipelines is the model's own)."""
    import shutil

    from PIL import Image

    from refl.cli import generate_main

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    for name, update in (("model_index.json", {"scheduler": ["diffusers", "EulerDiscreteScheduler"]}),
                         ("scheduler/scheduler_config.json", {"_class_name": "EulerDiscreteScheduler"})):
        (model / name).write_text(json.dumps(json.loads((model / name).read_text()) | update))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    assert generate_main(["--model", str(model), "--lora", str(lora_dir), "--prompts-file",
                          str(tmp_path / "prompts.txt"), "--images-per-prompt", "2", "--seed", "3",
                          "--num-inference-steps", "3", "--guidance-scale", "2", "--batch-size", "1",
                          "--device", "cpu",
                          "--out", str(tmp_path / "gen")]) == 0
    stock = pipeline_cls.from_pretrained(model)
    assert type(stock.scheduler).__name__ == "EulerDiscreteScheduler"
    stock.load_lora_weights(lora_dir)
    stock.set_progress_bar_config(disable=True)
    for k in range(2):
        want = stock(["a cat"], num_inference_steps=3, guidance_scale=2.0, output_type="np",
                     generator=torch.Generator().manual_seed(3 + k)).images[0]  # (H, W, 3) in [0, 1]
        want = (want * 255).round().astype(int)
        got = np.asarray(Image.open(tmp_path / "gen" / f"0000_{k:02d}.png")).astype(int)
        assert np.abs(got - want).max() <= 1, k  # one image per call, as the stock call: the same kernels


def test_generate_samples_with_the_models_own_scheduler_as_the_stock_pipeline(base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=2, alpha=8.0))
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    generate_equals_stock_pipeline(base_dir, tmp_path / "lora", StableDiffusionPipeline, tmp_path)
