"""refl.train: ReFL steps learn a learnable reward, a real critic plugs in, resume, the train script,
the image-caption regulariser, two processes, mixed precision and the optimizer choice."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers.lora import randomise_lora_b, tiny_lora
from helpers.training import PROMPTS, lora_file, tiny_train_overrides

from refl.step import GRAD_METHODS, NonFiniteLossError, StepConfig, reward_step

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting (100x slower).
torch.set_num_threads(1)


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


def test_resume_equals_uninterrupted_run(tmp_path):
    from refl.train import ReflConfig, train
    from runkit.config import load_config

    full = load_config(ReflConfig, None, tiny_train_overrides(tmp_path / "full"))
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

    interrupted = load_config(ReflConfig, None, tiny_train_overrides(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, reward_fn=crashing_contrast)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("update-*")] == ["update-000002"]
    resumed = load_config(ReflConfig, None,
                          tiny_train_overrides(tmp_path / "resumed") + ["train.resume=latest"])
    again = train(resumed)
    a = lora_file(tmp_path / "full" / "checkpoints" / "update-000004")
    b = lora_file(tmp_path / "resumed" / "checkpoints" / "update-000004")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    # What the run spent (refl/compute.py): rollouts and their gradient passes, carried on from the checkpoint
    spent = result["compute"]
    assert spent["denoiser_forwards"] > spent["denoiser_backwards"] > 0 and spent["seconds_training"] > 0
    assert {k: v for k, v in again["compute"].items() if not k.startswith("seconds")} == {
        k: v for k, v in spent.items() if not k.startswith("seconds")}
    # ... and training moved the weights at all
    start = lora_file(tmp_path / "full" / "checkpoints" / "update-000002")
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


    from refl.cli import train_main

    out = tmp_path / "run"
    argv = ["--config", "configs/refl_toy.yaml"]
    for o in tiny_train_overrides(out, updates=2) + [f"data.prompts_file={tmp_path / 'p.txt'}",
                                                      "train.validate_every=2", "train.log_with=tensorboard",
                                                      "train.validation_num_inference_steps=2",
                                                      "step.reg_weight=0.1",
                                                      "data.reg_pool_size=4", "reward.kind=critic"]:
        argv += ["--set", o]
    assert train_main(argv) == 0
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
    cfg = load_config(ReflConfig, None, tiny_train_overrides(out, updates=1) + [
        "step.reg_weight=1.0", f"data.reg_images={table}", "data.reg_pool_size=4", "step.kl_weight=0.5"])
    result = train(cfg)
    assert result["train/reg_loss"] > 0 and "train/kl_loss" in result
    bad = load_config(ReflConfig, None, tiny_train_overrides(tmp_path / "bad", updates=1) + [
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
    overrides = [o for o in tiny_train_overrides(tmp_path / "ddp", updates=3) if "dropout" not in o]
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "tests/helpers/ddp_train_lora.py", "refl",
           str(tmp_path / "ddp"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(tmp_path / "ddp" / "replica_0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp" / "replica_1.safetensors"))
    assert r0.keys() == r1.keys()
    assert max((r0[k] - r1[k]).abs().max().item() for k in r0) == 0.0
    # The ranks saw different prompts/noise, so identical replicas mean the gradients were averaged.
    start = lora_file(tmp_path / "ddp" / "checkpoints" / "update-000002")
    assert max((r0[k] - start[k]).abs().max().item() for k in r0) > 0


def test_adamw8bit_without_bitsandbytes_names_the_fix(monkeypatch):
    import sys

    from refl.config import ReflTrainConfig
    from runkit.optim import build_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # an import of it now fails
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], ReflTrainConfig(optimizer="adamw8bit"))
    with pytest.raises(ValueError, match="adamw8bit"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], ReflTrainConfig(optimizer="sgd"))


@pytest.mark.parametrize("method", sorted(GRAD_METHODS))
def test_bf16_training_with_validation_regulariser_kl_and_a_critic(tmp_path, method):
    """The bf16 path end to end on CPU: base weights in bf16, LoRA and optimizer in fp32, validation,
    the denoising regulariser's pool, the KL term and a real critic reward, every gradient method."""

    from refl.train import ReflConfig, train
    from runkit.config import load_config

    cfg = load_config(ReflConfig, None, tiny_train_overrides(tmp_path, updates=2) + [
        "reward.kind=critic", "reward.critic=tiny-clip", "train.mixed_precision=bf16",
        "train.validate_every=1",
        "train.validation_num_inference_steps=2", "train.gradient_accumulation=1", f"step.method={method}",
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
    lora = lora_file(tmp_path / "checkpoints" / "update-000002")
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast and the loss scaler need CUDA")
def test_fp16_training_on_cuda_uses_the_loss_scaler(tmp_path):

    from refl.train import ReflConfig, train
    from runkit.config import load_config

    cfg = load_config(ReflConfig, None, tiny_train_overrides(tmp_path, updates=3) + [
        "reward.kind=critic", "reward.critic=tiny-clip", "train.mixed_precision=fp16",
        "train.validate_every=3",
        "train.validation_num_inference_steps=2", "step.reg_weight=1.0", "step.kl_weight=1.0",
        "data.reg_pool_size=4"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    # the fp16 path ran with loss scaling
    assert (tmp_path / "checkpoints" / "update-000003" / "scaler.pt").is_file()
