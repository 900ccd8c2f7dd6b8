"""Everything that generates, with a LoRA of a flow-matching model (tiny-sd3, tiny-flux): `generate`, the
comparison harness, ReFL's validation and the benchmark. Each draws what the stock StableDiffusion3Pipeline /
FluxPipeline with `load_lora_weights` draws on the same seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.lora import randomise_lora_b
from PIL import Image

from refl.components import load_components, pipeline_class, save_pipeline
from refl.lora import LoraConfig, add_lora, save_lora
from refl.sampling import seed_generators

torch.set_num_threads(1)

FLOW = ["tiny-sd3", "tiny-flux"]
PROMPTS = ["a red cat", "a blue square"]
STEPS, GUIDANCE = 3, 3.0


@pytest.fixture(scope="module", params=FLOW)
def flow_lora(request, tmp_path_factory):
    """{"base": the preset saved as a diffusers directory, "lora": a LoRA of it (alpha != rank, B random),
    "components": the preset with that LoRA attached, "family"}."""
    root = tmp_path_factory.mktemp(request.param)
    components = load_components(request.param)
    base = save_pipeline(components, root / "base")
    add_lora(components, LoraConfig(rank=4, alpha=16.0))
    randomise_lora_b(components)
    lora = save_lora(components, root / "lora")
    return {"base": base, "lora": lora, "components": components, "family": components.family}


def stock_images(flow_lora, prompts, seeds, lora=True, generator=None) -> np.ndarray:
    """uint8 (N, H, W, 3) from the family's stock pipeline loaded from the saved folders, as a user would."""
    pipe = pipeline_class(flow_lora["family"]).from_pretrained(flow_lora["base"])
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(flow_lora["lora"])
    size = flow_lora["components"].image_size
    gens = generator if generator is not None else seed_generators(seeds)
    images = pipe(list(prompts), num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens,
                  height=size, width=size, output_type="np").images  # (N, H, W, 3) in [0, 1]
    return (images * 255).round().astype(np.uint8)


def _close(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.mark.parametrize("scheduler", ["model", "flow_euler"])
def test_generate_with_a_flow_lora_draws_what_the_stock_pipeline_draws(flow_lora, scheduler, tmp_path):
    from refl.generate import generate, load_pipeline

    pipe = load_pipeline(str(flow_lora["base"]), lora=str(flow_lora["lora"]), device="cpu",
                         scheduler=scheduler)
    rows = generate(pipe, PROMPTS, tmp_path / "gen", n=2, seed=3, num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, batch_size=4)
    ours = np.stack([np.asarray(Image.open(tmp_path / "gen" / r["file"])) for r in rows])  # (4, H, W, 3)
    prompts, seeds = [r["prompt"] for r in rows], [r["seed"] for r in rows]
    assert seeds == [3, 4, 3, 4]
    assert _close(ours, stock_images(flow_lora, prompts, seeds)) <= 1  # batched kernels: last bits only
    assert _close(ours, stock_images(flow_lora, prompts, seeds, lora=False)) > 2  # the LoRA was applied


def test_generate_script_with_a_flow_lora(flow_lora, tmp_path):
    from refl.cli import generate_main

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert generate_main(["--model", str(flow_lora["base"]), "--lora", str(flow_lora["lora"]),
                          "--prompts-file", str(tmp_path / "prompts.txt"), "--images-per-prompt", "1",
                          "--num-inference-steps", str(STEPS), "--guidance-scale", str(GUIDANCE),
                          "--mixed-precision", "bf16", "--device", "cpu",
                          "--out", str(tmp_path / "gen")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    size = flow_lora["components"].image_size
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(np.asarray(Image.open(tmp_path / "gen" / r["file"])).shape == (size, size, 3) for r in rows)


def test_harness_with_a_flow_lora_draws_what_the_stock_pipeline_draws(flow_lora, tmp_path):
    from evaluation import harness as H
    from evaluation.config import CompareConfig
    from evaluation.layout import samples_path
    from runkit.config import load_config

    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    cfg = load_config(CompareConfig, None, [
        f"model.name={flow_lora['base']}", f"lora={flow_lora['lora']}",
        f"prompts_file={tmp_path / 'prompts.txt'}",
        "n_samples=2", "batch_size=2", f"num_inference_steps={STEPS}", f"guidance_scale={GUIDANCE}",
        "scheduler=flow_euler", "critic=tiny-clip", "bootstrap_resamples=50", "throughput_repeats=1",
        f"output_dir={tmp_path / 'run'}"])
    results = H.run_compare(cfg)
    assert {"base_random", "refl_random", "base_best_of_2"} <= set(results["arms"])
    base = np.load(samples_path(tmp_path / "run", "base", 0))
    refl = np.load(samples_path(tmp_path / "run", "refl", 0))
    prompts = [PROMPTS[0]] * 2
    # one encoding per prompt (the pipeline's own encode_prompt), the same images as plain stock calls
    assert _close(base["images"], stock_images(flow_lora, prompts, base["seeds"], lora=False)) <= 1
    assert _close(refl["images"], stock_images(flow_lora, prompts, refl["seeds"])) <= 1
    assert _close(refl["images"], base["images"]) > 2
    throughput = json.loads((tmp_path / "run" / "throughput.json").read_text())["result"]
    assert throughput["ratio_vs_stock"] > 0


def test_validation_draws_the_tuned_flow_model(flow_lora, tmp_path):
    from torchvision.utils import make_grid

    from refl.config import ReflTrainConfig
    from refl.lora_training import validate
    from runkit.logs import RunLogger

    t = ReflTrainConfig(validation_prompts=PROMPTS, validation_images_per_prompt=2, validation_seed=7,
                        validation_num_inference_steps=STEPS, validation_guidance_scale=GUIDANCE)
    evals = validate(flow_lora["components"], t, "flow_euler", 3, tmp_path, RunLogger(tmp_path, True, "none"),
                     reward_fn=lambda images, prompts: images.mean(dim=(1, 2, 3)))
    assert 0 < evals["eval/reward"] < 1 and "eval/diversity" in evals
    grid = np.asarray(Image.open(tmp_path / "samples" / "update-000003.png").convert("RGB"))
    # validation draws 4 at a time from one generator seeded validation_seed
    prompts = [p for p in PROMPTS for _ in range(2)]
    expected = stock_images(flow_lora, prompts, None, generator=torch.Generator().manual_seed(7))
    expected = make_grid(torch.from_numpy(expected).permute(0, 3, 1, 2), nrow=8, padding=1)  # (3, H', W')
    assert _close(grid, expected.permute(1, 2, 0).numpy()) <= 1


@pytest.mark.parametrize("name", FLOW)
def test_bench_runs_a_flow_model_and_compares_with_its_stock_pipeline(name, tmp_path):
    from benchmarks.refl import main as bench_main

    out = tmp_path / "bench.json"
    assert bench_main(["--set", f"model={name}", "--set", "critic=tiny-clip", "--set", "batch_size=2",
                       "--set", "step.scheduler=flow_euler", "--set", "step.num_inference_steps=3",
                       "--set", "step.cut_range=[1,2]", "--set", "methods=[refl,direct_align]",
                       "--set", "image_px=32", "--set", "repeats=1", "--set", "warmup=0",
                       "--set", "best_of_n_batch_size=2", "--set", "sampling_repeats=1",
                       "--output-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["image_px"] == 32 and set(result["methods"]) == {"refl", "direct_align"}
    direct = result["methods"]["direct_align"]
    assert (direct["prefix_calls"], direct["grad_calls"]) == (3, 1)
    for row in result["methods"].values():
        assert all(s["seconds_per_update"] > 0 for s in row["settings"].values())
        # the transformer is what "unet" counts: checkpointing its calls reruns it, at most once
        assert 1.0 < row["settings"]["calls"]["recompute_ratio"]["unet"] <= 2.0
    pipeline = {"tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}[name]
    sampling = result["sampling_vs_stock_pipeline"]
    assert sampling["pipeline"] == pipeline
    assert sampling["ours_latents_shape"] == sampling["stock_latents_shape"] == [2, 16, 16, 16]
    best = result["best_of_n_vs_stock_pipeline"]
    assert best["pipeline"] == pipeline and best["batch_size"] == 2 and best["stock_seconds"] > 0
