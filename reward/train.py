"""Fine-tune a Social Reward critic on preference pairs, single process or `accelerate launch`.

The critic and the loss are wrapped in one `nn.Module` that `accelerator.prepare` sees, so under
DDP every trainable parameter (a learnable logit scale included) has its gradient synchronised.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reward.data import DataError, PairShards, PairShardSampler, collate_pairs
from reward.evaluate import evaluate_pairs, score_pairs
from reward.losses import LOSSES, create_loss
from reward.model import CriticConfig, SocialReward, create_critic
from runkit.config import save_config

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # Training pairs in one of the formats of reward/data.py: a parquet / csv / json(l) file, a folder
    # or glob of parquet / arrow shards (e.g. a Pick-a-Pic v2 download's data/train-*.parquet), or a
    # `datasets` save_to_disk folder. Streamed: rows are read a row group at a time.
    train: str = ""
    # Held-out pairs (same kinds of source); empty = hold out `val_fraction` of the training prompts.
    val: str = ""
    # Fraction of prompts (not pairs) held out when `val` is empty, chosen by a hash of the prompt.
    val_fraction: float = 0.1
    # social | pickapic | ranked | auto (detected from the columns).
    fmt: str = "auto"
    # keep | drop | half | auto (keep ties if the loss handles them, else drop).
    tie_policy: str = "auto"
    # error = stop at the first bad row; skip = drop bad rows and log how many and which.
    on_bad_row: str = "error"
    # Decode every training image once before training so a corrupt file fails now, not mid-run
    # (one full pass over the data; at scale run scripts/check_pairs.py once instead). Bad rows met
    # while training are caught either way (error, or skipped and counted).
    check_images: bool = False
    # DataLoader worker processes per process; images are decoded and resized in them.
    num_workers: int = 0
    # Row groups mixed together by the shuffle (per process). Each worker holds up to this many
    # row groups (+1) in memory: memory ~ num_workers x this x row-group size.
    shuffle_row_groups: int = 4


@dataclass
class LossConfig:
    # triplet (Social Reward) | pairwise (Bradley-Terry) | pickscore (2-way softmax, soft labels).
    name: str = "triplet"
    # Triplet margin on squared distances of unit vectors.
    margin: float = 0.3
    # Initial logit scale of the pairwise loss (learned).
    init_logit_scale: float = 10.0
    # Fixed logit scale of the pickscore loss (CLIP's temperature).
    pickscore_logit_scale: float = 100.0


@dataclass
class TrainConfig:
    # Pairs per process per micro-batch (global batch = this x processes x grad_accum).
    batch_size: int = 32
    # Passes over the training pairs.
    epochs: int = 10
    # Optimizer steps to stop after; 0 = run all epochs.
    max_steps: int = 0
    # AdamW learning rate (Social Reward's script: 3e-5).
    lr: float = 3e-5
    # AdamW weight decay.
    weight_decay: float = 0.0
    # constant | cosine (both after `warmup_steps` of linear warm-up).
    lr_schedule: str = "constant"
    # Optimizer steps of linear warm-up.
    warmup_steps: int = 0
    # Micro-batches per optimizer step.
    grad_accum: int = 1
    # Clip the global grad norm to this; 0 = no clipping (as in the paper).
    max_grad_norm: float = 0.0
    # no | fp16 | bf16 (accelerate autocast; weights and optimizer state stay float32).
    mixed_precision: str = "no"
    # Recompute the open_clip towers' blocks in the backward pass: less activation memory, ~1/3 more
    # compute. For large critics (ViT-L-14 at 224 px) and large batches.
    grad_checkpointing: bool = False
    # Seed for weights, data order and every RNG.
    seed: int = 0
    # Validate every this many optimizer steps; 0 = at the end of each epoch.
    eval_every: int = 0
    # Checkpoint every this many optimizer steps; 0 = at the end of each epoch.
    save_every: int = 0
    # Checkpoints kept (oldest deleted first); 0 = keep all.
    keep_checkpoints: int = 2
    # Log train scalars every this many optimizer steps.
    log_every: int = 10
    # After training, fit the affine score calibration on the held-out images (mean 0, std 1).
    calibrate: bool = True


@dataclass
class RewardExperiment:
    critic: CriticConfig = field(default_factory=CriticConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Where checkpoints, logs, the resolved config and the final critic go.
    output_dir: str = "runs/reward"

    def __post_init__(self):
        if self.loss.name not in LOSSES:
            raise ValueError(f"loss.name={self.loss.name!r}; choose one of {', '.join(LOSSES)}")
        if self.train.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule={self.train.lr_schedule!r}; choose constant or cosine")
        if self.train.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"train.mixed_precision={self.train.mixed_precision!r}; choose no, fp16 or bf16")
        if self.train.batch_size < 1 or self.train.grad_accum < 1:
            raise ValueError("train.batch_size and train.grad_accum must be >= 1")
        if self.data.shuffle_row_groups < 1:
            raise ValueError("data.shuffle_row_groups must be >= 1")


class CriticWithLoss(nn.Module):
    """What `accelerator.prepare` wraps: one forward = one loss, all trainable parameters inside."""

    def __init__(self, critic: SocialReward, loss: nn.Module):
        super().__init__()
        self.critic = critic
        self.loss = loss

    def forward(self, pos, neg, prompts, label, weight) -> dict[str, torch.Tensor]:
        img, txt = self.critic(torch.cat([pos, neg]), prompts, return_embeddings=True)  # (2B, D), (B, D)
        img_pos, img_neg = img.chunk(2)  # (B, D) each
        return self.loss(txt, img_pos, img_neg, label=label, weight=weight)


def lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    dirs = [p for p in (output_dir / "checkpoints").glob("step_*") if (p / "state.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        dirs = _checkpoint_dirs(output_dir)
        if not dirs:
            logger.info("--resume latest: no checkpoint in %s yet, starting fresh", output_dir / "checkpoints")
            return None
        return dirs[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint directory (no state.json)")
    return path


def save_checkpoint(accelerator: Accelerator, module: CriticWithLoss, output_dir: Path, state: dict,
                    keep: int) -> Path | None:
    """Write into a temp dir, then rename: a crash mid-write never leaves a half checkpoint as 'latest'."""
    final = output_dir / "checkpoints" / f"step_{state['step']:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        accelerator.unwrap_model(module).critic.save_pretrained(tmp / "critic")
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep:
            for old in _checkpoint_dirs(output_dir)[:-keep]:
                shutil.rmtree(old)
        logger.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final


def train(cfg: RewardExperiment, resume: str | None = None) -> dict:
    """Run training; returns the final metrics. Writes everything under cfg.output_dir."""
    out = Path(cfg.output_dir)
    tc = cfg.train
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
    )
    set_seed(tc.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    critic = create_critic(cfg.critic)
    if tc.grad_checkpointing:
        critic.set_grad_checkpointing(True)
    loss_fn = create_loss(cfg.loss.name, **_loss_kwargs(cfg.loss))
    handles_ties = getattr(loss_fn, "handles_ties", False)
    dc = cfg.data
    if not dc.train:
        raise ValueError("data.train is empty: set it to a pairs file (e.g. --set data.train=pairs.parquet)")
    train_set, val_set = _datasets(dc, critic.image_size, handles_ties)
    if dc.check_images:
        n_bad = check_all_images(train_set, tc.batch_size, dc.num_workers)
        logger.info("data.check_images: every training image decodes (%d bad row(s) skipped)", n_bad)

    sampler = PairShardSampler(train_set, tc.batch_size, seed=tc.seed, world=accelerator.num_processes,
                               shuffle_blocks=dc.shuffle_row_groups)
    # accelerate deals the interleaved batches out, one per process in turn: each process loads only
    # its own (and so reads only its own row groups).
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_pairs, num_workers=dc.num_workers)
    module = CriticWithLoss(critic, loss_fn)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = math.ceil(sampler.batches_per_process() / tc.grad_accum)
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.lr_schedule, tc.warmup_steps, total_steps))
    # The LR scheduler is stepped by hand once per optimizer step (a prepared one steps once per
    # process), and registered so save_state / load_state carry it.
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)

    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in critic.parameters())
    logger.info("%s, %d processes", accelerator.distributed_type, accelerator.num_processes)
    logger.info("critic %s (%s): %d of %d parameters train (mode %s); %d train pairs, %d val pairs; "
                "global batch %d; %d optimizer steps per epoch, %d in total",
                cfg.critic.model_name, cfg.critic.pretrained, n_train, n_total, cfg.critic.training_mode,
                len(train_set), len(val_set) if val_set is not None else 0, tc.batch_size * accelerator.num_processes * tc.grad_accum,
                steps_per_epoch, total_steps)

    step, epoch, batches_done = 0, 0, 0
    ckpt = resolve_resume(out, resume)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "state.json").read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_done"]
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batches_done)

    accelerator.init_trackers("tensorboard")
    history: list[dict] = []
    eval_every = tc.eval_every or steps_per_epoch
    save_every = tc.save_every or steps_per_epoch
    pbar = tqdm(total=total_steps, initial=step, desc="train critic", disable=not accelerator.is_local_main_process)
    running: dict[str, float] = {}
    n_bad = 0  # bad rows skipped by this process (on_bad_row=skip)
    while step < total_steps:
        sampler.epoch = epoch
        epoch_loader = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        for batch in epoch_loader:
            n_bad += batch["n_bad"]
            if batch["n_bad"] and n_bad <= batch["n_bad"] + 5:
                logger.warning("skipped bad row(s) (data.on_bad_row=skip): %s", " | ".join(batch["bad"][:5]))
            if not batch["prompt"]:
                raise DataError(f"every row of a batch (epoch {epoch}, batch {batches_done}) was bad, e.g. "
                                f"{batch['bad'][0]}; clean the set with scripts/check_pairs.py")
            with accelerator.accumulate(module):
                terms = module(batch["pos"], batch["neg"], batch["prompt"], batch["label"], batch["weight"])
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at step {step} (epoch {epoch}, batch {batches_done}); no update "
                        "was applied. Lower train.lr, use mixed_precision=no or bf16, or check the data.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batches_done += 1
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            running["_n"] = running.get("_n", 0) + 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            pbar.update(1)
            if step % tc.log_every == 0 or step == total_steps:
                n = running.pop("_n")
                logs = {f"train/{k}": v / n for k, v in running.items()}
                logs["train/lr"] = scheduler.get_last_lr()[0]
                accelerator.log(logs, step=step)
                pbar.set_postfix(loss=f"{logs['train/loss']:.4f}")
                running = {}
            if step % eval_every == 0 or step == total_steps:
                metrics = _evaluate(accelerator, module, val_set)
                if metrics:
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if np.isscalar(v)}, step=step)
                    history.append({"step": step, **metrics})
                    logger.info("step %d: eval pairwise accuracy %.3f", step, metrics["pairwise_accuracy"])
            if step % save_every == 0 or step == total_steps:
                save_checkpoint(accelerator, module, out, {"step": step, "epoch": epoch,
                                                           "batches_done": batches_done}, tc.keep_checkpoints)
            if step >= total_steps:
                break
        else:
            epoch += 1
            batches_done = 0
            continue
        break
    pbar.close()

    bad_total = int(accelerator.reduce(torch.tensor([n_bad], device=accelerator.device), reduction="sum").item())
    if bad_total:
        logger.warning("skipped %d bad row(s) in training (data.on_bad_row=skip); scripts/check_pairs.py "
                       "lists them all and writes a clean copy", bad_total)
    final: dict = {"step": step, "history": history, "bad_rows_skipped": bad_total}
    critic = accelerator.unwrap_model(module).critic
    if accelerator.is_main_process:
        if tc.calibrate and val_set is not None:
            # Raw cosines, whatever calibration the critic arrived with: the fitted scores get std 1.
            s_pos, s_neg = score_pairs(critic, val_set, raw=True)
            critic.calibrate_(torch.from_numpy(np.concatenate([s_pos, s_neg])))
        critic.save_pretrained(out / "critic")
        final["eval"] = history[-1] if history else None
        (out / "metrics.json").write_text(json.dumps(final, indent=2))
        logger.info("final critic written to %s", out / "critic")
    accelerator.end_training()
    # In memory only (not in metrics.json): every process's replica, for callers and tests.
    final["critic"] = critic
    return final


def _loss_kwargs(lc: LossConfig) -> dict:
    return {"triplet": {"margin": lc.margin}, "pairwise": {"init_logit_scale": lc.init_logit_scale},
            "pickscore": {"logit_scale": lc.pickscore_logit_scale}}[lc.name]


def _datasets(dc: DataConfig, image_size: int, handles_ties: bool):
    """Streaming train and validation sets (validation keeps ties: evaluation counts them apart)."""
    common = dict(fmt=dc.fmt, on_bad_row=dc.on_bad_row, cache_blocks=dc.shuffle_row_groups + 1)
    train_kw = dict(common, tie_policy=dc.tie_policy, loss_handles_ties=handles_ties)
    if dc.val:
        return PairShards(dc.train, image_size, **train_kw), PairShards(dc.val, image_size, **common,
                                                                         tie_policy="keep")
    train_set = PairShards(dc.train, image_size, **train_kw, split="train", val_fraction=dc.val_fraction)
    val_set = None
    if dc.val_fraction > 0:
        try:
            val_set = PairShards(dc.train, image_size, **common, tie_policy="keep", split="val",
                                 val_fraction=dc.val_fraction)
        except DataError as err:
            logger.warning("no validation pairs: %s", err)
    return train_set, val_set


def check_all_images(dataset: PairShards, batch_size: int, num_workers: int) -> int:
    """Decode every item once (the training path itself); returns the bad rows skipped."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs, num_workers=num_workers)
    return sum(batch["n_bad"] for batch in tqdm(loader, desc="checking images"))


def _evaluate(accelerator: Accelerator, module, val_set) -> dict | None:
    """Pairwise accuracy on the held-out pairs, computed on the main process."""
    metrics = None
    if accelerator.is_main_process and val_set is not None:
        critic = accelerator.unwrap_model(module).critic
        metrics = evaluate_pairs(critic, val_set)
    accelerator.wait_for_everyone()
    return metrics
