"""benchmarks/: the ReFL benchmark, its memory model and the critic's benchmark on tiny models, and the
declarations (BenchSpec) every gradient method gives them."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from helpers.grad_methods import last_step, registering, unet_calls

from benchmarks.memory_model import MemoryModelConfig, memory_model, shortened
from benchmarks.refl import ReflBenchConfig, pinned_steps, settings_for
from benchmarks.refl import main as bench_main
from refl.components import Checkpointing, load_components
from refl.step import (
    GRAD_METHODS,
    BenchSpec,
    GradMethod,
    MethodResult,
    StepConfig,
    checkpointing_for,
    reward_step,
)

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting.
torch.set_num_threads(1)


@pytest.fixture
def registered():
    """register(name, method) for one test; the registry is as before afterwards."""
    with registering() as register:
        yield register


def _brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))  # (B,)


@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_each_method_runs_the_calls_its_bench_spec_declares(method):
    """What the benchmark reads of a method (its pinned path, the shortened prefix of the memory model, the
    calls of each) is what the method runs."""
    components = load_components("tiny")
    spec = GRAD_METHODS[method].bench
    cfg = ReflBenchConfig(methods=[method],
                          step=StepConfig(num_inference_steps=6, cut_range=[2, 4], draft_k=3))
    (pinned,) = pinned_steps(cfg).values()
    assert pinned.cut_range[0] == pinned.cut_range[1]
    for step in (pinned, shortened(pinned, spec)):
        calls, handle = unet_calls(components)
        out = reward_step(components, ["a cat"], _brightness, step, torch.Generator().manual_seed(0))
        handle.remove()
        prefix = calls.index(True)  # no-grad calls before the first with gradient
        assert (prefix, len(calls) - prefix) == spec.calls(step) and all(calls[prefix:]), (step, calls)
        assert int(out["cut"]) == step.cut_range[0]  # the pinned cut is where the path starts
    assert spec.calls(shortened(pinned, spec))[0] == 1


def test_the_bench_measures_a_new_method_by_its_own_declaration(registered, tmp_path):
    """A method registered here, through the last two steps with UNet blocks recomputed: the benchmark pins,
    shortens, counts and checkpoints it as it declares, not with refl's figures (one call at the last step,
    whole calls)."""

    def last_two(ctx, latents):
        timesteps = ctx.timesteps
        latents = ctx.run_no_grad(latents, timesteps[:-2])
        for t in timesteps[-2:]:
            latents = ctx.step(ctx.grad_eps(latents, t), t, latents).prev_sample  # (B, C, h, w)
        return MethodResult([latents], len(timesteps) - 2)

    def pin(cfg):
        return replace(cfg, cut_range=[cfg.num_inference_steps - 2] * 2)

    def calls(cfg):
        return cfg.num_inference_steps - 2, 2

    blocks = Checkpointing(unet="blocks", vae_decoder=True)
    registered("last_two", GradMethod(last_two, blocks, bench=BenchSpec(pin, calls, {"blocks": blocks})))
    cfg = ReflBenchConfig(methods=["last_two"], step=StepConfig(num_inference_steps=5))
    (step,) = pinned_steps(cfg).values()
    assert step.method == "last_two" and step.cut_range == [3, 3]
    assert settings_for("last_two") == ("blocks", {"none": Checkpointing(), "blocks": blocks})
    short = shortened(step, GRAD_METHODS["last_two"].bench)
    assert short.num_inference_steps == 3 and short.cut_range == [1, 1]
    out = tmp_path / "bench.json"
    assert bench_main(["--set", "model=tiny", "--set", "critic=tiny-clip", "--set", "methods=[last_two]",
                       "--set", "step.num_inference_steps=5", "--set", "batch_size=1", "--set", "repeats=1",
                       "--set", "warmup=0", "--set", "sampling_repeats=0",
                       "--output-file", str(out)]) == 0
    row = json.loads(out.read_text())["methods"]["last_two"]
    assert (row["default"], row["prefix_calls"], row["grad_calls"]) == ("blocks", 3, 2)
    assert set(row["settings"]) == {"none", "blocks"}
    assert row["settings"]["blocks"]["checkpointing"] == asdict(blocks)
    assert 1.0 < row["settings"]["blocks"]["recompute_ratio"]["unet"] < 2.0  # blocks, not whole calls


def test_a_method_without_a_bench_spec_is_refused_by_name(registered, capsys):
    registered("undeclared", GradMethod(last_step, checkpointing_for("refl", True)))
    with pytest.raises(ValueError, match=r"'undeclared' declares no BenchSpec \(GradMethod.bench\)"):
        pinned_steps(ReflBenchConfig(methods=["undeclared"]))
    assert bench_main(["--set", "model=tiny", "--set", "methods=[undeclared]"]) == 2
    assert "'undeclared' declares no BenchSpec" in capsys.readouterr().err
    # Its own policy must be among the settings it declares.
    with pytest.raises(ValueError, match="must hold its own checkpointing"):
        registered("wrong", GradMethod(last_step, Checkpointing(unet="calls"),
                                       bench=GRAD_METHODS["refl"].bench))


def test_bench_config_takes_the_vocabulary_and_refuses_the_old_names(capsys):
    assert bench_main(["--set", "batch=2"]) == 2
    assert "batch" in capsys.readouterr().err
    assert bench_main(["--set", "mixed_precision=fp32"]) == 2
    assert "choose one of no, fp16, bf16" in capsys.readouterr().err
    # Each method's knobs are checked before any model loads.
    assert bench_main(["--set", "model=no-such-model", "--set", "step.num_inference_steps=3"]) == 2
    assert "cut_range [35, 39] must be" in capsys.readouterr().err


def test_bench_script_reports_phases_memory_and_recomputation_per_method(tmp_path):
    out = tmp_path / "bench.json"
    # refl at the last of 3 steps, draft and alignprop through the last 2
    assert bench_main(["--set", "model=tiny", "--set", "critic=tiny-clip", "--set", "batch_size=2",
                       "--set", "step.num_inference_steps=3", "--set", "step.cut_range=[1,2]",
                       "--set", "step.draft_k=2", "--set", "repeats=1", "--set", "mixed_precision=bf16",
                       "--set", "best_of_n_batch_size=2", "--set", "sampling_repeats=1",
                       "--output-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == set(GRAD_METHODS)
    assert result["device"]["threads"] >= 1 and len(result["device"]["load_average_1_5_15"]) == 3
    for method, row in result["methods"].items():
        assert row["default"] == checkpointing_for(method, True).unet
        assert row["update_tflop"] > 0 and row["model_flop_utilisation"] is None  # no known peak for a CPU
        assert row["dominant_phase"] in row["settings"][row["default"]]["seconds_by_phase"]
        for name, setting in row["settings"].items():
            assert {"sampling", "grad_step", "decode", "critic", "backward", "optimizer"} <= set(
                setting["seconds_by_phase"]), (method, name)
            assert setting["seconds_per_update"] > 0 and setting["executed_tflop"] >= row["update_tflop"]
        plain, ours = row["settings"]["none"], row["settings"][row["default"]]
        assert plain["recompute_ratio"]["unet"] == 1.0 and 1.0 < ours["recompute_ratio"]["unet"] <= 2.0
        assert ours["peak_tensor_gib"] < plain["peak_tensor_gib"]  # what checkpointing is for
    assert result["methods"]["alignprop"]["grad_calls"] == 2 and result["methods"]["refl"]["grad_calls"] == 1
    assert result["sampling_vs_stock_pipeline"]["ratio"] > 0
    assert result["best_of_n_vs_stock_pipeline"]["ratio_vs_stock"] > 0


def test_memory_model_fit_predicts_a_size_and_batch_it_did_not_fit():
    # tiny-clip's own size is 16 px: every measured size is resized to it, so each runs the same ops.
    # alignprop from cut 2 of 4 steps: through the last 2.
    model = memory_model(MemoryModelConfig(model="tiny", critic="tiny-clip", mixed_precision="no",
                                           methods=["alignprop"], target_px=64, points_px=[24, 32, 40],
                                           step=StepConfig(scheduler="ddpm", num_inference_steps=4,
                                                           cut_range=[2, 3])))
    entry = model["methods"]["alignprop"]
    assert (entry["prefix_calls"], entry["grad_calls"]) == (2, 2)
    rows = entry["settings"]
    for row in rows.values():
        # batch 1 runs a few other ops
        assert row["check_predicted_over_measured"] == pytest.approx(1.0, abs=0.02)
        assert row["peak_gib"]["1"] < row["peak_gib"]["2"] < row["peak_gib"]["4"]
        assert row["seconds_per_update"]["4"] == pytest.approx(4 * row["seconds_per_update"]["1"])
    default = entry["default"]
    assert rows[default]["peak_gib"]["4"] < rows["none"]["peak_gib"]["4"]
    assert rows[default]["recompute_ratio_unet"] <= 2.0 and rows["none"]["recompute_ratio_unet"] == 1.0
    assert model["table_markdown"].count("| alignprop |") == 3 and "(`true`)" in model["table_markdown"]


def test_bench_script_runs_sdxl_and_compares_with_the_stock_sdxl_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_main(["--set", "model=tiny-sdxl", "--set", "critic=tiny-clip", "--set", "batch_size=2",
                       "--set", "step.num_inference_steps=3", "--set", "step.cut_range=[1,2]",
                       "--set", "methods=[refl]", "--set", "repeats=1", "--set", "warmup=0",
                       "--set", "best_of_n_batch_size=2", "--set", "sampling_repeats=1",
                       "--output-file", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["model"] == "tiny-sdxl" and result["image_px"] == 16
    assert set(result["methods"]) == {"refl"}
    assert all(s["seconds_per_update"] > 0 for s in result["methods"]["refl"]["settings"].values())
    # Our sampling and the stock SDXL pipeline's call drew the same latents: 2 images, same size.
    sampling = result["sampling_vs_stock_pipeline"]
    assert sampling["pipeline"] == "StableDiffusionXLPipeline" and sampling["num_inference_steps"] == 3
    assert sampling["ours_latents_shape"] == sampling["stock_latents_shape"]
    assert sampling["ours_latents_shape"][0] == 2
    assert sampling["ours_seconds"] > 0 and sampling["stock_seconds"] > 0
    # The harness's best-of-N batch against the stock SDXL pipeline's call on the same 2 seeds.
    best = result["best_of_n_vs_stock_pipeline"]
    assert best["pipeline"] == "StableDiffusionXLPipeline" and best["batch_size"] == 2
    assert best["ours_seconds"] > 0 and best["stock_seconds"] > 0


def test_reward_bench_times_the_critic_and_streamed_loading(tmp_path):
    from benchmarks.reward import main

    out = tmp_path / "reward.json"
    assert main(["--set", "critics=[tiny-clip]", "--set", "batch_size=4", "--set", "repeats=2",
                 "--set", "device=cpu", "--set", "stream_rows=8", "--set", "stream_image_px=32",
                 "--set", "stream_image_size=16", "--set", "stream_workers=[0]",
                 "--output-file", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["critic"] == "tiny-clip" and row["batch_size"] == 4 and row["mixed_precision"] == "no"
    assert row["scoring_images_per_s"] > 0 and row["training_pairs_per_s"] > 0
    assert result["streamed_loading"]["rows"] == 8 and result["streamed_loading"]["pairs_per_s_workers_0"] > 0
    assert main(["--set", "precision=fp32"]) == 2
