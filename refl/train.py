"""ReFL LoRA training loop: prompts -> reward_step -> AdamW on the LoRA, under accelerate.

Batch sizes: `train.batch_size` prompts per micro-batch per process, `train.gradient_accumulation`
micro-batches per update, so one update sees batch_size * gradient_accumulation * num_processes
prompts (ImageReward: 2 * 4 * 8 = 64). The UNet is not wrapped in DDP: after the micro-batches the
LoRA gradients are averaged across processes explicitly (`_all_reduce_grads`), which keeps the
many no-grad UNet calls and the multi-call gradient methods (DRaFT-K, AlignProp) away from DDP's
once-per-iteration hooks. Every random draw of an update (prompts, noise, cut) comes from a
generator seeded by (seed, update, micro-batch, rank), so `--resume latest` replays the run exactly.

Several processes on CPU: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...`
(`accelerate launch --cpu` starts a single process unless MPI is set up).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from refl.components import DTYPES, ModelConfig, SDComponents, _replace_dir, load_components
from refl.lora import LoraSettings, add_lora, load_lora_state, lora_state, save_lora
from refl.prompts import read_prompt_file
from refl.sampling import make_pipeline, sample
from refl.step import (
    NonFiniteLossError,
    RewardFn,
    StepConfig,
    base_weights,
    encode_images,
    reward_step,
    validate_step_config,
)
from reward.standard import STANDARD_KINDS
from runkit.config import save_config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config
@dataclass
class RewardConfig:
    # Reward kind, a key of REWARDS: "critic" (a Social Reward checkpoint or open_clip name), a standard
    # reward model ("pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "clipscore"; weights from
    # `standard`), "mix" (the weighted sum in `mix`), or the synthetic "brightness" / "contrast" rewards
    # for smoke tests.
    kind: str = "critic"
    # Critic checkpoint directory (reward/ training output) or open_clip "name[:pretrained]"; frozen.
    critic: str = "toy-clip"
    # Weights of the standard reward models: kind -> argument of its spec, i.e. a local path (file layouts
    # in reward/standard.py), a hub id, or "" for the default hub id; options follow commas, e.g.
    # {hpsv2: weights/HPS_v2_compressed.pt, aesthetic: "weights,backbone=ViT-L-14:weights/vit-l-14.bin"}.
    standard: dict[str, str] = field(default_factory=dict)
    # kind "mix": reward = sum of weight * term, term -> weight, terms being REWARDS kinds other than "mix",
    # e.g. {critic: 1.0, hpsv2: 0.5}. The terms keep their own scales (HPS v2 ~0.25, PickScore ~20), so a
    # weight is an exchange rate. Each term is logged unweighted as train/reward/<term>.
    mix: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    # Training prompts: a .txt file (one per line), a .parquet/.csv with a `prompt_column`; or None to use `prompts`.
    prompts_file: str | None = None
    # Column holding prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # Inline prompt list, used when prompts_file is None.
    prompts: list[str] = field(default_factory=lambda: ["a red square on a blue background", "a green circle",
                                                        "a yellow triangle", "a purple square at the top"])
    # Denoising-regulariser pool (used when refl.reg_weight > 0), built once at start: this many
    # examples in all (global count, split across processes).
    reg_pool_size: int = 64
    # Image-caption set for the denoising regulariser (the paper's pre-training data): a .parquet/.csv/
    # .jsonl table of image paths (relative to the table) and captions; reg_pool_size rows are drawn.
    # None = base-model samples (LoRA off) of the training prompts instead.
    reg_images: str | None = None
    # Column of reg_images holding the image paths.
    reg_image_column: str = "image"
    # Column of reg_images holding the captions.
    reg_caption_column: str = "caption"


@dataclass
class TrainConfig:
    # Run directory: config.yaml, metrics.jsonl, samples/, checkpoints/, lora/, training_curve.png.
    output_dir: str = "runs/refl"
    # Seed of everything random in the run (prompt order, noise, cut steps, LoRA init).
    seed: int = 0
    # Optimizer updates in total (global, not per process).
    max_updates: int = 100
    # Prompts per micro-batch, per process.
    batch_size: int = 2
    # Micro-batches per optimizer update, per process.
    gradient_accumulation: int = 4
    # Optimizer of the LoRA tensors, a key of OPTIMIZERS: "adamw" or "adamw8bit" (bitsandbytes, CUDA;
    # its states take a quarter of the memory, which matters for a large LoRA, hardly for rank 4).
    optimizer: str = "adamw"
    # AdamW peak learning rate (per update).
    lr: float = 1e-5
    # AdamW decoupled weight decay.
    weight_decay: float = 1e-2
    # AdamW betas.
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # AdamW epsilon.
    adam_eps: float = 1e-8
    # Gradient clipping on the global LoRA gradient norm; 0 disables.
    max_grad_norm: float = 1.0
    # LR schedule, a key of LR_SCHEDULES: "constant" or "cosine" (to 0 at max_updates), after warmup.
    lr_schedule: str = "constant"
    # Linear warmup length, in updates.
    warmup_updates: int = 0
    # "no", "fp16" or "bf16": dtype of the frozen base weights and autocast; LoRA stays fp32.
    mixed_precision: str = "no"
    # Log scalars every this many updates.
    log_every: int = 1
    # "tensorboard" (scalars + image grids under output_dir/tb) or "none" (metrics.jsonl only).
    log_with: str = "tensorboard"
    # Sample the validation prompts every this many updates (and at the end); 0 disables.
    validate_every: int = 25
    # Fixed validation prompts shown in the image grid.
    validation_prompts: list[str] = field(default_factory=lambda: ["a red square on a blue background",
                                                                   "a green circle", "a yellow triangle"])
    # Validation images per prompt.
    validation_images_per_prompt: int = 2
    # Seed of the validation noise (the same images every time, so grids compare across updates).
    validation_seed: int = 1234
    # Sampler steps for validation images.
    validation_steps: int = 40
    # Classifier-free guidance for validation images (1 = off).
    validation_guidance: float = 1.0
    # Save a resumable checkpoint every this many updates; 0 only at the end.
    checkpoint_every: int = 50
    # Keep this many newest checkpoints; older ones are deleted.
    checkpoints_keep: int = 2
    # Resume from "latest" (newest checkpoint in output_dir/checkpoints) or a checkpoint path; None starts fresh.
    resume: str | None = None


@dataclass
class ReflConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the Stable Diffusion base
    lora: LoraSettings = field(default_factory=LoraSettings)  # the adapters that train
    refl: StepConfig = field(default_factory=StepConfig)  # the reward-gradient step
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, logging, checkpoints
    reward: RewardConfig = field(default_factory=RewardConfig)  # what is maximised
    data: DataConfig = field(default_factory=DataConfig)  # training prompts


# ----------------------------------------------------------------------------- registries
def _critic_reward(cfg: RewardConfig, device, dtype: torch.dtype = torch.float32,
                   gradient_checkpointing: bool = False) -> RewardFn:
    import reward

    critic = reward.load(cfg.critic, device=device)
    critic.requires_grad_(False).eval()  # frozen: gradients pass through it to the images, never into it
    # The towers in the base's dtype (a ViT-L-14 is 1.7 GB in fp32); calibration buffers stay fp32.
    critic.clip.to(dtype)
    critic.set_grad_checkpointing(gradient_checkpointing)
    return critic


def _brightness_reward(cfg: RewardConfig, device, **_) -> RewardFn:
    return lambda images, prompts: images.mean(dim=(1, 2, 3))  # (B,)


def _contrast_reward(cfg: RewardConfig, device, **_) -> RewardFn:
    def fn(images, prompts):
        w = images.shape[-1] // 2
        return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10  # (B,)

    return fn


def _standard_reward(kind: str):
    def factory(cfg: RewardConfig, device, dtype: torch.dtype = torch.float32,
                gradient_checkpointing: bool = False) -> RewardFn:
        from reward.standard import load_standard

        model = load_standard(f"{kind}:{cfg.standard.get(kind) or ''}", device=device, dtype=dtype)  # frozen, eval
        model.set_grad_checkpointing(gradient_checkpointing)
        return model

    return factory


def _mix_reward(cfg: RewardConfig, device, **kwargs) -> RewardFn:
    from refl.mix import WeightedRewards

    if not cfg.mix:
        raise ValueError("reward.kind=mix needs reward.mix, e.g. {critic: 1.0, hpsv2: 0.5}")
    bad = [name for name in cfg.mix if name not in REWARDS or name == "mix"]
    if bad:
        raise ValueError(f"reward.mix terms {bad} are not reward kinds; choose from "
                         f"{sorted(k for k in REWARDS if k != 'mix')}")
    return WeightedRewards({name: REWARDS[name](cfg, device, **kwargs) for name in cfg.mix}, cfg.mix)


REWARDS = {"critic": _critic_reward, "brightness": _brightness_reward, "contrast": _contrast_reward,
           **{kind: _standard_reward(kind) for kind in STANDARD_KINDS}, "mix": _mix_reward}


def build_reward(cfg: RewardConfig, device, dtype: torch.dtype = torch.float32,
                 gradient_checkpointing: bool = False) -> RewardFn:
    """The frozen reward, its weights in `dtype`, checkpointed in backward if asked (where it can be)."""
    if cfg.kind not in REWARDS:
        raise ValueError(f"unknown reward.kind {cfg.kind!r}; choose one of {sorted(REWARDS)}")
    unused = sorted(set(cfg.standard) - set(STANDARD_KINDS))
    if unused:
        raise ValueError(f"reward.standard has unknown kinds {unused}; choose from {sorted(STANDARD_KINDS)}")
    return REWARDS[cfg.kind](cfg, device, dtype=dtype, gradient_checkpointing=gradient_checkpointing)


def _adamw(params, t: TrainConfig):
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)


def _adamw_8bit(params, t: TrainConfig):
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError("train.optimizer=adamw8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA), or "
                           "set train.optimizer=adamw") from err
    return bnb.optim.AdamW8bit(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                               weight_decay=t.weight_decay)


OPTIMIZERS = {"adamw": _adamw, "adamw8bit": _adamw_8bit}


def build_optimizer(params, t: TrainConfig):
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer {t.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[t.optimizer](params, t)


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


LR_SCHEDULES = {"constant": _constant, "cosine": _cosine}


def lr_lambda(cfg: TrainConfig):
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown train.lr_schedule {cfg.lr_schedule!r}; choose one of {sorted(LR_SCHEDULES)}")
    shape = LR_SCHEDULES[cfg.lr_schedule]

    def factor(update: int) -> float:
        if update < cfg.warmup_updates:
            return (update + 1) / cfg.warmup_updates
        span = max(1, cfg.max_updates - cfg.warmup_updates)
        return shape((update - cfg.warmup_updates) / span)

    return factor


# ----------------------------------------------------------------------------- data
def load_prompts(cfg: DataConfig) -> list[str]:
    """Prompts from a .txt (one per line), .parquet or .csv file, or the inline list."""
    if cfg.prompts_file is not None:
        return read_prompt_file(cfg.prompts_file, cfg.prompt_column, "data.prompts_file", "data.prompt_column")
    prompts = [p.strip() for p in cfg.prompts if p and p.strip()]
    if not prompts:
        raise ValueError("no training prompts: set data.prompts_file or data.prompts")
    return prompts


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def prompts_for(prompts: list[str], seed: int, start: int, count: int) -> list[str]:
    """Items [start, start + count) of the endless stream of per-epoch shuffles of `prompts`."""
    n = len(prompts)
    out = []
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        perm = np.random.default_rng(_seed_for(seed, epoch)).permutation(n)
        out.append(prompts[perm[pos]])
    return out


# ----------------------------------------------------------------------------- logging
class RunLogger:
    """Main-process-only sink: metrics.jsonl always, TensorBoard scalars and images if enabled."""

    def __init__(self, out: Path, enabled: bool, log_with: str, resume_update: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # drop records past the resumed update: they will be replayed
            keep = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("update", 0) <= resume_update]
            self.path.write_text("".join(line + "\n" for line in keep))
        if log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_update + 1 if resume_update else None)
        elif log_with != "none":
            raise ValueError(f"train.log_with must be 'tensorboard' or 'none', got {log_with!r}")

    def scalars(self, update: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"update": update, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, update)

    def image(self, update: int, tag: str, grid: torch.Tensor) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid, update)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Reward and loss against updates, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line] if metrics_path.exists() else []
    rows = [r for r in rows if "train/reward" in r]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ["train/reward", "train/loss"]):
        ax.plot([r["update"] for r in rows], [r[key] for r in rows])
        ax.set_xlabel("update")
        ax.set_title(key)
    evals = [json.loads(line) for line in metrics_path.read_text().splitlines() if "eval/reward" in line]
    if evals:
        axes[0].plot([r["update"] for r in evals], [r["eval/reward"] for r in evals], "o-", label="validation")
        axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- state and checkpoints
@dataclass
class TrainState:
    update: int = 0  # optimizer updates done


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, accelerator, components: SDComponents, optimizer, lr_sched, state: TrainState,
                    keep: int) -> Path:
    """checkpoints/update-NNNNNN/: LoRA (peft + diffusers format), optimizer, LR schedule, RNG per rank, step.
    Written into a temp dir and renamed by the main process, so a crash never leaves a partial checkpoint."""
    from safetensors.torch import save_file

    root = out / "checkpoints"
    final = root / f"update-{state.update:06d}"
    tmp = root / f".tmp-update-{state.update:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file(lora_state(components), str(tmp / "lora_state.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                   tmp / "training_state.pt")
        save_lora(components, tmp / "lora")
        (tmp / "state.json").write_text(json.dumps({"update": state.update}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
        for old in sorted(root.glob("update-*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(out: Path, resume: str) -> Path | None:
    """The checkpoint to resume from; None for "latest" when the run has none yet (a fresh start)."""
    if resume == "latest":
        found = sorted((out / "checkpoints").glob("update-*"))
        if not found:
            logger.info("--resume latest: no checkpoint under %s yet, starting fresh", out / "checkpoints")
            return None
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a checkpoint directory (no state.json)")
    return path


def load_checkpoint(path: Path, accelerator, components, optimizer, lr_sched) -> TrainState:
    from safetensors.torch import load_file

    load_lora_state(components, {k: v.to(accelerator.device) for k, v in
                                 load_file(str(path / "lora_state.safetensors")).items()})
    blob = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    lr_sched.load_state_dict(blob["lr_scheduler"])
    if blob.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(blob["scaler"])
    rng = path / f"rng_{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        logger.warning("%s has no RNG state for rank %d (different process count?)", path, accelerator.process_index)
    return TrainState(**json.loads((path / "state.json").read_text()))


# ----------------------------------------------------------------------------- pieces of the loop
def _all_reduce_grads(params: list[torch.nn.Parameter], accelerator) -> None:
    """Average LoRA gradients over processes in one flat all-reduce (the model is not DDP-wrapped)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numels,)
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


@torch.no_grad()
def validate(components: SDComponents, cfg: ReflConfig, reward_fn: RewardFn, update: int, out: Path,
             run_logger: RunLogger) -> float:
    """Fixed prompts and seeds -> image grid PNG (+ TensorBoard) and mean reward."""
    from torchvision.utils import make_grid, save_image

    t = cfg.train
    prompts = [p for p in t.validation_prompts for _ in range(t.validation_images_per_prompt)]
    was_training = components.unet.training
    components.unet.eval()
    try:
        with components.autocast():  # the reward's weights are in the base's dtype too
            # 4 at a time: at 512 px the VAE decoder's activations set the peak memory of a large batch.
            images = sample(make_pipeline(components, cfg.refl.scheduler), prompts, output="pt", batch_size=4,
                            num_inference_steps=t.validation_steps, guidance_scale=t.validation_guidance,
                            generator=torch.Generator().manual_seed(t.validation_seed))  # (N, 3, H, W)
            score = reward_fn(images, prompts).float().mean().item()
    finally:
        components.unet.train(was_training)
    grid = make_grid(images.float().cpu(), nrow=t.validation_images_per_prompt * 4, padding=1)
    (out / "samples").mkdir(exist_ok=True)
    save_image(grid, out / "samples" / f"update-{update:06d}.png")
    run_logger.image(update, "eval/samples", grid)
    return score


def load_caption_images(path: str | os.PathLike, image_column: str, caption_column: str, size: int,
                        limit: int, seed: int, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, list[str]]:
    """Up to `limit` rows of an image-caption table (random rows, fixed by `seed`) -> images (N, 3, S, S)
    in [0, 1] (shortest side resized to `size`, centre crop) and their captions.

    `shard` = (index, count): this process reads only every count-th of those rows, from `index`."""
    import pandas as pd

    from reward.model import load_image_tensor

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.reg_images {path} does not exist (a .parquet, .csv or .jsonl table with "
                                f"columns {image_column!r} and {caption_column!r})")
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix not in readers:
        raise ValueError(f"data.reg_images {path}: unsupported suffix {path.suffix!r}; use one of {sorted(readers)}")
    frame = readers[path.suffix](path)
    missing = [c for c in (image_column, caption_column) if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing} (columns: {list(frame.columns)}); set "
                         "data.reg_image_column / data.reg_caption_column")
    if len(frame) == 0:
        raise ValueError(f"{path} has no rows")
    rows = np.random.default_rng(seed).permutation(len(frame))[:limit]
    index, count = shard
    if len(rows) < count:
        raise ValueError(f"data.reg_images {path} has {len(rows)} row(s) for {count} processes; every process "
                         "needs at least one")
    images, captions = [], []
    for i in sorted(rows[index::count].tolist()):
        caption = frame[caption_column].iloc[i]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path} row {i}: empty caption in column {caption_column!r}; fill it or drop the row")
        image = Path(str(frame[image_column].iloc[i]))
        image = image if image.is_absolute() else path.parent / image
        try:
            images.append(load_image_tensor(image, size))  # (3, S, S)
        except OSError as err:
            raise type(err)(f"{path} row {i}: {err}") from err
        captions.append(caption.strip())
    return torch.stack(images), captions  # (N, 3, S, S), N captions


def _reg_pool(components, cfg: ReflConfig, prompts, accelerator):
    """Clean latents and captions for the denoising regulariser: the configured image-caption set
    (VAE-encoded) or base-model (LoRA off) samples of the training prompts."""
    n = max(1, cfg.data.reg_pool_size // accelerator.num_processes)
    gen = torch.Generator().manual_seed(_seed_for(cfg.train.seed, 8, accelerator.process_index))
    if cfg.data.reg_images:
        d = cfg.data
        size = components.image_size
        images, captions = load_caption_images(d.reg_images, d.reg_image_column, d.reg_caption_column, size,
                                               n * accelerator.num_processes, cfg.train.seed,
                                               shard=(accelerator.process_index, accelerator.num_processes))
        latents = torch.cat([encode_images(components, images[i : i + 16], gen) for i in range(0, len(images), 16)])
        logger.info("denoising regulariser: %d images from %s", len(captions), d.reg_images)
        return latents, captions  # (n, C, h, w), n captions
    captions = prompts_for(prompts, _seed_for(cfg.train.seed, 7), accelerator.process_index * n, n)
    with base_weights(components), components.autocast():
        latents = sample(make_pipeline(components, cfg.refl.scheduler), captions, generator=gen, batch_size=16,
                         num_inference_steps=cfg.refl.num_inference_steps, output="latent")  # (n, C, h, w)
    return latents, captions


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"train.mixed_precision must be one of no, fp16, bf16, got {mixed_precision!r}")
    return DTYPES[mixed_precision]


def apply_update(accelerator, optimizer, lr_sched, params, max_grad_norm: float, name: str) -> tuple[float, bool]:
    """Clip, step the optimizer and the LR schedule; returns (gradient norm, skipped).

    Under fp16 the loss scaler skips an update whose gradients overflowed (and lowers its scale); the
    LR schedule then does not step either, so the schedule counts updates that really happened.
    Without a scaler a non-finite gradient is an error: nothing would ever repair it."""
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        accelerator.unscale_gradients()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    if not torch.isfinite(grad_norm) and accelerator.scaler is None:
        raise NonFiniteLossError(f"{name}: gradient norm is {grad_norm}; no update was made")
    optimizer.step()
    skipped = bool(getattr(optimizer, "step_was_skipped", False))
    if skipped:
        logger.warning("%s: fp16 gradients overflowed; the loss scaler skipped this update", name)
    else:
        lr_sched.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), skipped


# ----------------------------------------------------------------------------- the loop
def train(cfg: ReflConfig, reward_fn: RewardFn | None = None) -> dict:
    """Run (or resume) ReFL LoRA training; returns paths and final metrics. reward_fn overrides cfg.reward."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t = cfg.train
    validate_step_config(cfg.refl)
    weight_dtype = _weight_dtype(t.mixed_precision)
    lr_factor = lr_lambda(t)
    if t.batch_size < 1 or t.gradient_accumulation < 1 or t.max_updates < 1:
        raise ValueError("train.batch_size, train.gradient_accumulation and train.max_updates must be >= 1")
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    out = Path(t.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    rank, world = accelerator.process_index, accelerator.num_processes
    per_update = t.batch_size * t.gradient_accumulation * world
    logger.info("processes %d, prompts per update %d (= %d per micro-batch x %d accumulation x %d processes), "
                "%d updates, %d prompts seen", world, per_update, t.batch_size, t.gradient_accumulation, world,
                t.max_updates, per_update * t.max_updates)

    prompts = load_prompts(cfg.data)
    components = load_components(cfg.model)
    # Frozen base in the mixed-precision dtype (half the memory); the VAE and text encoder stay frozen too.
    components.to(accelerator.device, dtype=None if weight_dtype == torch.float32 else weight_dtype)
    torch.manual_seed(t.seed)
    params = add_lora(components, cfg.lora)
    components.unet.train()
    components.set_gradient_checkpointing(cfg.refl.gradient_checkpointing)
    reward_fn = reward_fn or build_reward(cfg.reward, accelerator.device, weight_dtype, cfg.refl.gradient_checkpointing)

    optimizer = build_optimizer(params, t)
    optimizer = accelerator.prepare(optimizer)  # wraps the fp16 GradScaler; the schedule stays ours
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lr_factor)

    state = TrainState()
    ckpt = find_checkpoint(out, t.resume) if t.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator, components, optimizer, lr_sched)
        logger.info("resumed from %s at update %d", ckpt, state.update)
    run_logger = RunLogger(out, accelerator.is_main_process, t.log_with, state.update)
    reg_pool = _reg_pool(components, cfg, prompts, accelerator) if cfg.refl.reg_weight > 0 else None

    bar = tqdm(total=t.max_updates, initial=state.update, disable=not accelerator.is_main_process, desc="ReFL")
    metrics: dict[str, float] = {}
    while state.update < t.max_updates:
        terms = defaultdict(list)
        for micro in range(t.gradient_accumulation):
            # Global prompt stream position of this rank's micro-batch: every prompt of an epoch once.
            start = ((state.update * t.gradient_accumulation + micro) * world + rank) * t.batch_size
            batch = prompts_for(prompts, t.seed, start, t.batch_size)
            gen = torch.Generator().manual_seed(_seed_for(t.seed, state.update, micro, rank))
            reg_batch = None
            if reg_pool is not None:
                idx = torch.randint(0, len(reg_pool[1]), (t.batch_size,), generator=gen)
                reg_batch = (reg_pool[0][idx], [reg_pool[1][i] for i in idx.tolist()])
            with accelerator.autocast():
                step_out = reward_step(components, batch, reward_fn, cfg.refl, gen, reg_batch=reg_batch,
                                       step_name=f"update {state.update + 1} micro-batch {micro + 1} (rank {rank})")
            accelerator.backward(step_out["loss"] / t.gradient_accumulation)
            for k, v in step_out.items():
                terms[k].append(v.detach().float())
        _all_reduce_grads(params, accelerator)
        current_lr = lr_sched.get_last_lr()[0]
        grad_norm, skipped = apply_update(accelerator, optimizer, lr_sched, params, t.max_grad_norm,
                                          f"update {state.update + 1}")
        state.update += 1
        bar.update(1)

        # Means over micro-batches and processes (a collective: every rank runs it).
        means = {k: torch.stack(v).mean().to(accelerator.device) for k, v in terms.items()}
        means = {k: accelerator.reduce(v, reduction="mean").item() for k, v in means.items()}
        metrics = {"train/loss": means.pop("loss"), "train/reward": means.pop("reward"),
                   "train/grad_norm": float(grad_norm), "train/lr": current_lr, "train/skipped": float(skipped)}
        metrics.update({f"train/{k}": v for k, v in means.items()})
        if state.update % t.log_every == 0 or state.update == t.max_updates:
            run_logger.scalars(state.update, metrics)
            bar.set_postfix(reward=f"{metrics['train/reward']:.4f}", loss=f"{metrics['train/loss']:.4g}")
        if t.validate_every and (state.update % t.validate_every == 0 or state.update == t.max_updates):
            if accelerator.is_main_process:
                score = validate(components, cfg, reward_fn, state.update, out, run_logger)
                run_logger.scalars(state.update, {"eval/reward": score})
        if (t.checkpoint_every and state.update % t.checkpoint_every == 0) or state.update == t.max_updates:
            save_checkpoint(out, accelerator, components, optimizer, lr_sched, state, t.checkpoints_keep)
    bar.close()

    result = {"output_dir": str(out), "updates": state.update, **metrics}
    if accelerator.is_main_process:
        result["lora"] = str(save_lora(components, out / "lora"))
        curve = plot_curve(out / "metrics.jsonl", out / "training_curve.png")
        result["curve"] = str(curve) if curve else None
        (out / "result.json").write_text(json.dumps(result, indent=2))
    run_logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def setup_logging(main_process: bool | None = None) -> None:
    """INFO on the main process, warnings elsewhere (rank from the launcher's environment)."""
    if main_process is None:
        main_process = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


__all__ = ["ReflConfig", "TrainConfig", "RewardConfig", "DataConfig", "TrainState", "train", "load_prompts",
           "build_reward", "REWARDS", "LR_SCHEDULES", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "setup_logging"]
