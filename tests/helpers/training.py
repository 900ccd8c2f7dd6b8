"""Prompts, training overrides and checkpoint reading shared by the ReFL tests."""

import torch

PROMPTS = ["a red square on a blue background", "a green circle", "a yellow triangle at the top", "a cat"]


def tiny_train_overrides(out, updates=4):
    return [f"train.output_dir={out}", "model.name=tiny", "reward.kind=contrast",
            f"train.max_updates={updates}",
            "train.batch_size=2", "train.gradient_accumulation=2", "train.lr=1e-2",
            "train.lr_schedule=cosine",
            "train.warmup_updates=1", "train.checkpoint_every=2", "train.log_with=none",
            "train.validation_num_inference_steps=2",
            "step.num_inference_steps=4", "step.cut_range=[1,3]", "step.scheduler=ddpm", "lora.dropout=0.1",
            "step.grad_scale=1.0"]


def lora_file(path):
    """The LoRA tensors a checkpoint resumes from (the custom state registered with accelerate)."""
    states = [torch.load(f, weights_only=True) for f in sorted(path.glob("custom_checkpoint_*.pkl"))]
    (lora,) = [s for s in states if any("lora_" in k for k in s)]
    return lora
