"""refl/: tiny SD components (same factory as real runs), LoRA round trip, the ReFL step, training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers.lora import randomise_lora_b

from refl.components import PRESETS, build_clip_tokenizer, build_pipeline, load_components, save_pipeline
from refl.lora import LoraConfig, add_lora, save_lora, trainable_parameters
from refl.step import (
    GRAD_METHODS,
    NonFiniteLossError,
    StepConfig,
    reward_step,
)

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting (100x slower).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red square on a blue background", "a green circle", "a yellow triangle at the top", "a cat"]


def brightness(images, prompts):
    """A learnable stand-in reward: mean pixel value of each decoded image, (B,)."""
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    save_pipeline(load_components("tiny"), path)
    return path


def tiny_lora(rank=4, alpha=4.0, **kw):
    components = load_components("tiny")
    params = add_lora(components, LoraConfig(rank=rank, alpha=alpha, **kw))
    return components, params


# ----------------------------------------------------------------------------- components
def test_tokenizer_ids_equal_open_clip():
    import open_clip

    ours = build_clip_tokenizer(77)
    theirs = open_clip.get_tokenizer("ViT-B-32")
    assert len(ours) == 49408
    for prompt in ["a red square on a blue background", "Hello, World! It's 3:45pm...", "héllo café naïve",
                   "a photo of an astronaut riding a horse on mars", "   spaced    out\ttext  ",
                   "UPPER lower 123"]:
        ref = theirs([prompt])[0].tolist()
        ref = ref[: ref.index(49407) + 1]  # open_clip pads with 0 after <|endoftext|>
        assert ours(prompt).input_ids == ref, prompt


def test_presets_build_with_design_shapes():
    toy = load_components("toy")
    spec = PRESETS["toy"]
    assert toy.image_size == 32 and toy.unet.config.sample_size == 8
    assert tuple(toy.vae.config.block_out_channels) == (32, 32, 64) and toy.vae.config.latent_channels == 4
    assert (tuple(toy.unet.config.block_out_channels) == (64, 128)
            and toy.unet.config.cross_attention_dim == 64)
    assert toy.text_encoder.config.hidden_size == 64 and toy.text_encoder.config.num_hidden_layers == 2
    assert (toy.text_encoder.config.max_position_embeddings == spec.context_length
            == toy.tokenizer.model_max_length)
    # Seeded: the same preset twice gives identical weights.
    again = load_components("toy")
    assert all(torch.equal(a, b) for a, b in zip(toy.unet.parameters(), again.unet.parameters()))


def test_saved_pipeline_loads_offline_with_stock_diffusers(base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    image = pipe("a cat", num_inference_steps=2, output_type="np", guidance_scale=1.0).images
    assert image.shape == (1, 16, 16, 3)
    again = load_components(str(base_dir))
    assert again.image_size == 16


def test_xformers_missing_raises_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name == "xformers" or name.startswith("xformers."):
            raise ImportError("No module named 'xformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    from refl.components import ModelConfig

    with pytest.raises(RuntimeError, match=r"pip install social-refl\[xformers\]"):
        load_components(ModelConfig(name="tiny", attention="xformers"))


# ----------------------------------------------------------------------------- LoRA
def test_lora_round_trip_through_stock_pipeline(base_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=4, alpha=16.0, train_text_encoder=True))  # alpha != rank
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    tuned = run(build_pipeline(components))
    stock = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None)
    base_images = run(stock)
    stock.load_lora_weights(tmp_path / "lora")
    reloaded = run(stock)
    assert np.abs(tuned - base_images).max() > 1e-2  # the LoRA does change the images
    assert np.abs(tuned - reloaded).max() < 1e-5


def test_only_lora_params_train_and_stay_fp32():
    components = load_components("tiny")
    components.to(dtype=torch.bfloat16)
    params = add_lora(components, LoraConfig())
    assert params and all(p.dtype == torch.float32 for p in params)
    assert trainable_parameters(components) == params
    assert any(p.dtype == torch.bfloat16 for p in components.unet.parameters())


def _train_reward(components, params, reward_fn, updates, lr, prompts, cfg):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rewards = []
    for i in range(updates):
        out = reward_step(components, prompts, reward_fn, cfg, torch.Generator().manual_seed(i))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rewards.append(out["reward"].item())
    return rewards


def left_right_contrast(images, prompts):
    """Learnable through a random-weight VAE: (left half - right half brightness) * 10, (B,).

    Plain mean brightness is not: the random decoder's GroupNorms cancel any uniform latent shift
    (checked: +-3 on a latent channel moves the mean by < 0.002), while spatial structure passes.
    """
    w = images.shape[-1] // 2
    return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10


def test_short_run_raises_learnable_reward():
    from refl.sampling import make_pipeline, sample

    components, params = tiny_lora(rank=4, alpha=4.0)
    cfg = StepConfig(num_inference_steps=4, cut_range=[1, 3], reward_margin=2.0)

    def held_out_score():  # fresh samples (fixed seed) on all prompts, not the training trajectories
        images = sample(make_pipeline(components), PROMPTS, num_inference_steps=4, output="pt",
                        generator=torch.Generator().manual_seed(123))  # (B, 3, H, W)
        return left_right_contrast(images, PROMPTS).mean().item()

    start = held_out_score()
    _train_reward(components, params, left_right_contrast, updates=30, lr=1e-1, prompts=PROMPTS[:2], cfg=cfg)
    end = held_out_score()
    assert end > start + 0.1, (start, end)


def test_real_critic_plugs_in():
    from reward.model import CriticConfig, create_critic

    critic = create_critic(CriticConfig(model_name="toy-clip",
                                        training_mode="all")).eval().requires_grad_(False)
    components, params = tiny_lora()
    randomise_lora_b(components)  # B = 0 would give A no gradient
    cfg = StepConfig(num_inference_steps=4, cut_range=[1, 3])
    # 16 px SD images into a 32 px critic: the critic resizes inside its differentiable path.
    out = reward_step(components, PROMPTS[:2], critic, cfg, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["reward"]) and -1.0 <= out["reward"].item() <= 1.0  # an uncalibrated cosine
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in critic.parameters())


# ----------------------------------------------------------------------------- training loop
def _tiny_train_overrides(out, updates=4):
    return [f"train.output_dir={out}", "model.name=tiny", "reward.kind=contrast",
            f"train.max_updates={updates}",
            "train.batch_size=2", "train.gradient_accumulation=2", "train.lr=1e-2",
            "train.lr_schedule=cosine",
            "train.warmup_updates=1", "train.checkpoint_every=2", "train.log_with=none",
            "train.validation_steps=2",
            "step.num_inference_steps=4", "step.cut_range=[1,3]", "step.scheduler=ddpm", "lora.dropout=0.1",
            "step.grad_scale=1.0"]


def _lora_file(path):
    """The LoRA tensors a checkpoint resumes from (the custom state registered with accelerate)."""
    states = [torch.load(f, weights_only=True) for f in sorted(path.glob("custom_checkpoint_*.pkl"))]
    (lora,) = [s for s in states if any("lora_" in k for k in s)]
    return lora


def test_resume_equals_uninterrupted_run(tmp_path):
    from refl.train import ReflConfig, train
    from runkit.config import load_config

    full = load_config(ReflConfig, None, _tiny_train_overrides(tmp_path / "full"))
    result = train(full)
    assert (tmp_path / "full" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert ((tmp_path / "full" / "config.yaml").is_file()
            and (tmp_path / "full" / "training_curve.png").is_file())
    assert result["updates"] == 4

    calls = {"n": 0}

    def crashing_contrast(images, prompts):
        calls["n"] += 1
        if calls["n"] > 5:  # dies in update 3, after the update-2 checkpoint (2 micro-batches per update)
            raise KeyboardInterrupt("simulated crash")
        w = images.shape[-1] // 2
        return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10

    interrupted = load_config(ReflConfig, None, _tiny_train_overrides(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, reward_fn=crashing_contrast)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("update-*")] == ["update-000002"]
    resumed = load_config(ReflConfig, None,
                          _tiny_train_overrides(tmp_path / "resumed") + ["train.resume=latest"])
    train(resumed)
    a = _lora_file(tmp_path / "full" / "checkpoints" / "update-000004")
    b = _lora_file(tmp_path / "resumed" / "checkpoints" / "update-000004")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # ... and training moved the weights at all
    start = _lora_file(tmp_path / "full" / "checkpoints" / "update-000002")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4


def test_train_script_main_and_prompt_files(tmp_path, capsys):
    import pandas as pd

    from refl.config import ReflDataConfig
    from refl.prompts import training_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    pd.DataFrame({"prompt": ["x", "y"]}).to_parquet(tmp_path / "p.parquet")
    assert training_prompts(ReflDataConfig(prompts_file=str(tmp_path / "p.txt"))) == ["a cat", "a dog"]
    assert training_prompts(ReflDataConfig(prompts_file=str(tmp_path / "p.parquet"))) == ["x", "y"]
    with pytest.raises(ValueError, match="no column"):
        training_prompts(ReflDataConfig(prompts_file=str(tmp_path / "p.parquet"), prompt_column="caption"))

    import importlib.util

    spec = importlib.util.spec_from_file_location("train_refl", os.path.join("scripts", "train_refl.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    argv = ["--config", "configs/refl_toy.yaml"]
    for o in _tiny_train_overrides(out, updates=2) + [f"data.prompts_file={tmp_path / 'p.txt'}",
                                                      "train.validate_every=2", "train.log_with=tensorboard",
                                                      "train.validation_steps=2", "step.reg_weight=0.1",
                                                      "data.reg_pool_size=4", "reward.kind=critic"]:
        argv += ["--set", o]
    assert script.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["updates"] == 2 and "train/reg_loss" in result
    assert (out / "samples" / "update-000002.png").is_file() and any((out / "tb").iterdir())
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert any("eval/reward" in m for m in metrics) and any("train/grad_norm" in m for m in metrics)


def _caption_table(tmp_path, n=3):
    import pandas as pd
    from PIL import Image

    rows = []
    for i in range(n):
        arr = np.full((20, 28, 3), 40 * i, dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "caption": f"a grey square {i}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "captions.parquet")
    return tmp_path / "captions.parquet", rows


def test_caption_images_for_the_regulariser_load_and_bad_rows_are_named(tmp_path):
    import pandas as pd

    from refl.reg_pool import load_caption_images

    table, rows = _caption_table(tmp_path)
    images, captions = load_caption_images(table, "image", "caption", size=16, limit=2, seed=0)
    assert (images.shape == (2, 3, 16, 16) and len(captions) == 2
            and set(captions) < {r["caption"] for r in rows})
    assert 0.0 <= images.min() and images.max() <= 1.0
    # Two processes read disjoint halves of the same drawn rows.
    halves = [load_caption_images(table, "image", "caption", 16, 2, 0, shard=(k, 2))[1] for k in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(captions) and not set(halves[0]) & set(halves[1])
    with pytest.raises(ValueError, match="1 row.* for 2 processes"):
        load_caption_images(table, "image", "caption", 16, 1, 0, shard=(0, 2))
    with pytest.raises(ValueError, match=r"no column\(s\) \['text'\]"):
        load_caption_images(table, "image", "text", 16, 2, 0)
    pd.DataFrame([*rows, {"image": "gone.png", "caption": "x"}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(FileNotFoundError, match="row 3.*gone.png"):
        load_caption_images(tmp_path / "bad.csv", "image", "caption", 16, 10, 0)
    pd.DataFrame([*rows, {"image": "img0.png", "caption": " "}]).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ValueError, match="row 3: empty caption"):
        load_caption_images(tmp_path / "empty.csv", "image", "caption", 16, 10, 0)


def test_training_with_an_image_caption_regulariser_set(tmp_path):
    from refl.train import ReflConfig, train
    from runkit.config import load_config

    table, _ = _caption_table(tmp_path, n=4)
    out = tmp_path / "run"
    cfg = load_config(ReflConfig, None, _tiny_train_overrides(out, updates=1) + [
        "step.reg_weight=1.0", f"data.reg_images={table}", "data.reg_pool_size=4", "step.kl_weight=0.5"])
    result = train(cfg)
    assert result["train/reg_loss"] > 0 and "train/kl_loss" in result
    bad = load_config(ReflConfig, None, _tiny_train_overrides(tmp_path / "bad", updates=1) + [
        "step.reg_weight=1.0", f"data.reg_images={tmp_path / 'missing.parquet'}"])
    with pytest.raises(FileNotFoundError, match="data.reg_images"):
        train(bad)


def test_two_process_cpu_launch_keeps_replicas_identical(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    # `accelerate launch --cpu` runs one process (it expects MPI for more); torchrun-style launching
    # plus ACCELERATE_USE_CPU gives accelerate's MULTI_CPU mode with the gloo backend.
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    overrides = [o for o in _tiny_train_overrides(tmp_path / "ddp", updates=3) if "dropout" not in o]
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no",
           "--dynamo_backend", "no", "tests/refl_multiproc_worker.py", str(tmp_path / "ddp"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "ddp" / "replica_0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "replica_1.safetensors"))
    assert r0.keys() == r1.keys()
    assert max((r0[k] - r1[k]).abs().max().item() for k in r0) == 0.0
    # The ranks saw different prompts/noise, so identical replicas mean the gradients were averaged.
    start = _lora_file(tmp_path / "ddp" / "checkpoints" / "update-000002")
    assert max((r0[k] - start[k]).abs().max().item() for k in r0) > 0


def test_generate_script_writes_pngs_and_jsonl(base_dir, tmp_path):
    import importlib.util

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=2, alpha=8.0))
    randomise_lora_b(components)
    save_lora(components, tmp_path / "lora")
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    spec = importlib.util.spec_from_file_location("generate_script", os.path.join("scripts", "generate.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--model", str(base_dir), "--lora", str(tmp_path / "lora"), "--prompts",
                        str(tmp_path / "prompts.txt"), "--n", "2", "--seed", "3", "--steps", "2", "--critic",
                        "toy-clip", "--device", "cpu", "--out", str(tmp_path / "gen")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a cat", 3), ("a cat", 4), ("a dog", 3),
                                                        ("a dog", 4)]
    assert all((tmp_path / "gen" / r["file"]).is_file() and isinstance(r["critic_score"], float)
               for r in rows)


@pytest.mark.slow
def test_sd15_architecture_takes_lora():
    """SD 1.5's UNet shape from its published config, random weights, nothing downloaded."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    assert 855e6 < sum(p.numel() for p in unet.parameters()) < 865e6  # SD 1.5: 859.5M

    from refl.components import SDComponents

    components = SDComponents(unet, torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), None, None)
    params = add_lora(components, LoraConfig(rank=4, alpha=4))
    # 16 transformer blocks x 2 attentions x 4 projections x (A, B)
    assert len(params) == 16 * 2 * 4 * 2
    assert 0.7e6 < sum(p.numel() for p in params) < 0.9e6


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_bf16_training_with_validation_regulariser_kl_and_a_critic(tmp_path, method):
    """The bf16 path end to end on CPU: base weights in bf16, LoRA and optimizer in fp32, validation,
    the denoising regulariser's pool, the KL term and a real critic reward, every gradient method."""

    from refl.train import ReflConfig, train
    from runkit.config import load_config

    cfg = load_config(ReflConfig, None, _tiny_train_overrides(tmp_path, updates=2) + [
        "reward.kind=critic", "reward.critic=tiny-clip", "train.mixed_precision=bf16",
        "train.validate_every=1",
        "train.validation_steps=2", "train.gradient_accumulation=1", f"step.method={method}",
        "step.reg_weight=1.0",
        "step.kl_weight=1.0", "data.reg_pool_size=4", "lora.dropout=0.0", "train.lr_schedule=constant",
        "train.warmup_updates=0"])
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2 and all(np.isfinite(r["train/loss"]) for r in train_rows)
    assert all(r["train/kl_loss"] >= 0 and np.isfinite(r["train/reg_loss"]) for r in train_rows)
    assert [r["update"] for r in rows if "eval/reward" in r] == [0, 1, 2]  # update 0: the base
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "update-000000.png", "update-000001.png", "update-000002.png"]
    lora = _lora_file(tmp_path / "checkpoints" / "update-000002")
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B moved off its zero init
    assert result["updates"] == 2


def test_lr_schedule_does_not_step_on_an_update_the_scaler_skipped():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from refl.train import apply_update

    accelerator = Accelerator()
    param = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    accelerator.scaler = scaler  # what accelerate sets up for fp16 on a GPU
    optimizer = AcceleratedOptimizer(torch.optim.SGD([param], lr=0.1), scaler=scaler)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda u: 1.0 / (u + 1))

    scaler.scale((param * float("inf")).sum()).backward()  # overflow: the scaler must skip this update
    norm, skipped = apply_update(accelerator, optimizer, sched, [param], 1.0, "update 1")
    assert skipped and not np.isfinite(norm)
    assert torch.equal(param.detach(), torch.ones(3)) and sched.last_epoch == 0 and scaler.get_scale() < 4.0

    scaler.scale(param.sum()).backward()
    norm, skipped = apply_update(accelerator, optimizer, sched, [param], 1.0, "update 2")
    assert not skipped and sched.last_epoch == 1 and not torch.equal(param.detach(), torch.ones(3))

    plain = Accelerator()  # no scaler (fp32 / bf16): a non-finite gradient is an error, not a skip
    param.grad = torch.full((3,), float("nan"))
    with pytest.raises(NonFiniteLossError, match="update 3"):
        apply_update(plain, plain.prepare(torch.optim.SGD([param], lr=0.1)), sched, [param], 1.0, "update 3")


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
    pipe = load_pipeline(str(base_dir), lora=str(tmp_path / "lora"), device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    rows = generate(pipe, ["a cat"], tmp_path / "gen", n=2, seed=0, num_inference_steps=2, batch_size=2)
    assert len(rows) == 2 and all((tmp_path / "gen" / r["file"]).is_file() for r in rows)


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    import sys

    from refl.config import ReflTrainConfig
    from runkit.optim import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it now fails
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], ReflTrainConfig(optimizer="adamw8bit"))
    with pytest.raises(ValueError, match="adamw8bit"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], ReflTrainConfig(optimizer="sgd"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and the loss scaler need CUDA")
def test_fp16_training_on_cuda_uses_the_loss_scaler(tmp_path):

    from refl.train import ReflConfig, train
    from runkit.config import load_config

    cfg = load_config(ReflConfig, None, _tiny_train_overrides(tmp_path, updates=3) + [
        "reward.kind=critic", "reward.critic=tiny-clip", "train.mixed_precision=fp16",
        "train.validate_every=3",
        "train.validation_steps=2", "step.reg_weight=1.0", "step.kl_weight=1.0", "data.reg_pool_size=4"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    # the fp16 path ran with loss scaling
    assert (tmp_path / "checkpoints" / "update-000003" / "scaler.pt").is_file()
