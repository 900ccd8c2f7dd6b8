"""What every LoRA trainer of Stable Diffusion shares (ReFL's refl/train.py and preference tuning's
preference/train.py): the base with adapters, optimizer and LR schedule registered for checkpoints, the
LoRA tensors as checkpoint state, the explicit gradient all-reduce, one optimizer update, when a periodic
event is due, and validation samples scored by held-out judges.

The UNet is not wrapped in DDP by either trainer: after the micro-batches the LoRA gradients are averaged
across processes explicitly (`all_reduce_grads`), which keeps no-grad UNet calls (sampling, a reference
model's pass) and multi-call gradient paths away from DDP's once-per-iteration hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from refl import guard
from refl.components import (
    DTYPES,
    Checkpointing,
    ModelConfig,
    SDComponents,
    denoiser_module_names,
    load_components,
)
from refl.config import ReflTrainConfig
from refl.lora import (
    LORA_WEIGHTS,
    LoraConfig,
    add_lora,
    check_lora_dir,
    check_lora_file,
    check_target_modules,
    load_lora_state,
    lora_state,
    start_from_lora,
)
from refl.sampling import make_pipeline, sample
from refl.step import NonFiniteLossError
from refl.text_embeddings import pipeline_embeds
from runkit.checkpoints import init_weights, load_checkpoint
from runkit.config import save_config
from runkit.logs import RunLogger
from runkit.optim import build_optimizer
from runkit.schedules import build_lr_scheduler

logger = logging.getLogger(__name__)


class LoraCheckpointState:
    """The LoRA tensors as an object accelerate's save_state / load_state carry
    (register_for_checkpointing)."""

    def __init__(self, components: SDComponents):
        self.components = components

    def state_dict(self) -> dict[str, torch.Tensor]:
        return lora_state(self.components)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.components.denoiser.device
        load_lora_state(self.components, {k: v.to(device) for k, v in state.items()})


def prepare_lora_training(model: ModelConfig, lora: LoraConfig, t,
                          checkpointing: Checkpointing | Callable[[str], Checkpointing], accelerator):
    """Base model with LoRA, optimizer and LR schedule (registered for checkpoints, in this order: the
    schedule, then the LoRA); returns (components, params, optimizer, lr_sched). `t` is a trainer's `train`
    config (runkit.config.TrainSettings); `checkpointing` the recomputation, or a function of the model's
    family giving it (ReFL's: refl.step.checkpointing_for)."""
    weight_dtype = DTYPES[t.mixed_precision]
    # train.init_from: an earlier run's LoRA (found before the model loads); the reference pass of KL and
    # DPO terms (adapters off) stays the base model
    start = init_weights(t.init_from, "lora", lambda d: (d / LORA_WEIGHTS).is_file(),
                         "LoRA") if t.init_from else None
    names = denoiser_module_names(model)  # a local folder's, from its config alone
    if names is not None:
        check_target_modules(lora, names, f"the denoiser of {model.name}")
    components = load_components(model)
    # Frozen base in the mixed-precision dtype (half the memory); the VAE and text encoder stay frozen too.
    components.to(accelerator.device, dtype=None if weight_dtype == torch.float32 else weight_dtype)
    params = add_lora(components, lora, seed=t.seed)
    if start is not None:
        start_from_lora(components, start, lora)
    components.denoiser.train()
    components.set_gradient_checkpointing(checkpointing if isinstance(checkpointing, Checkpointing)
                                          else checkpointing(components.family))
    optimizer = accelerator.prepare(build_optimizer(params, t))  # wraps the fp16 GradScaler
    # Stepped by us once per update that really happened (apply_update), so not prepared.
    lr_sched = build_lr_scheduler(t.lr_schedule, optimizer.optimizer, t.warmup_updates, t.max_updates)
    accelerator.register_for_checkpointing(lr_sched)
    accelerator.register_for_checkpointing(LoraCheckpointState(components))
    return components, params, optimizer, lr_sched


def all_reduce_grads(params: list[torch.nn.Parameter], accelerator) -> None:
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


def apply_update(accelerator, optimizer, lr_sched, params, max_grad_norm: float,
                 name: str) -> tuple[float, bool]:
    """Clip, step the optimizer and the LR schedule; returns (gradient norm, skipped).

    Under fp16 the loss scaler skips an update whose gradients overflowed (and lowers its scale); the
    LR schedule then does not step either, so the schedule counts updates that really happened.
    Without a scaler a non-finite gradient is an error: nothing would ever repair it."""
    if max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    else:
        accelerator.unscale_gradients()
        norms = [p.grad.norm() for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
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


def due(every: int, update: int, last: int) -> bool:
    """Whether a periodic event (validation, checkpoint, log line) happens after `update`: every `every`
    updates (0: never in between) and always after the last."""
    return update == last or (every > 0 and update % every == 0)




@torch.no_grad()
def validate(components: SDComponents, t: ReflTrainConfig, scheduler: str, update: int, out: Path,
             run_logger: RunLogger, judges: dict | None = None, reward_fn=None) -> dict[str, float]:
    """Fixed prompts and seeds -> image grid PNG (+ TensorBoard) and eval metrics: the mean training reward
    when the trainer has one (`reward_fn`: eval/reward), each held-out judge's mean score
    (eval/heldout/<spec>) and the images' diversity (eval/diversity, when there are 2+ images per prompt);
    see refl/guard.py."""
    from torchvision.utils import make_grid, save_image

    prompts: Sequence[str] = [p for p in t.validation_prompts for _ in range(t.validation_images_per_prompt)]
    was_training = components.denoiser.training
    components.denoiser.eval()
    metrics: dict[str, float] = {}
    try:
        with components.autocast():  # the reward's weights are in the base's dtype too
            # 4 at a time: at 512 px the VAE decoder's activations set the peak memory of a large batch.
            # the text encoders freed, the pipeline reads the embeddings computed at start
            text = ({"prompts": prompts} if components.text_embeddings is None else
                    {"embeds": pipeline_embeds(components, list(prompts), t.validation_guidance_scale)})
            images = sample(make_pipeline(components, scheduler), **text, output="pt", batch_size=4,
                            num_inference_steps=t.validation_num_inference_steps,
                            guidance_scale=t.validation_guidance_scale,
                            generator=torch.Generator().manual_seed(t.validation_seed))  # (N, 3, H, W)
            if reward_fn is not None:
                metrics["eval/reward"] = reward_fn(images, prompts).float().mean().item()
    finally:
        components.denoiser.train(was_training)
    metrics.update(guard.judge(judges or {}, images, prompts))
    diversity = guard.pixel_diversity(images, t.validation_images_per_prompt)
    if diversity is not None:
        metrics["eval/diversity"] = diversity
    grid = make_grid(images.float().cpu(), nrow=t.validation_images_per_prompt * 4, padding=1)
    (out / "samples").mkdir(exist_ok=True)
    save_image(grid, out / "samples" / f"update-{update:06d}.png")
    run_logger.image(update, "eval/samples", grid)
    return metrics


def check_resumed_lora(ckpt: Path | None, lora: LoraConfig) -> None:
    """The LoRA a resumed run continues (its checkpoint's lora/), read from the file's header before the
    model loads: readable, of the diffusers layout, of rank > 0 (refl.lora.check_lora_file), and of the
    rank lora.rank asks for. One line naming train.resume or lora.rank and the fix."""
    if ckpt is None:
        return
    try:
        ranks = set(check_lora_file(check_lora_dir(Path(ckpt) / "lora")).values())
    except (ValueError, OSError) as err:
        raise type(err)(f"train.resume {ckpt}: the checkpoint's LoRA cannot be read ({err}); resume from "
                        "an earlier checkpoint (--resume <run>/checkpoints/update-N) or start fresh in "
                        "another output_dir") from None
    if ranks and ranks != {lora.rank}:
        was = ", ".join(map(str, sorted(ranks)))
        raise ValueError(f"train.resume {ckpt}: its LoRA has rank {was} but lora.rank={lora.rank}; resume "
                         f"with --set lora.rank={was}, or start fresh in another output_dir")


def open_run(cfg, accelerator, out: Path, ckpt: Path | None, changed: list[str], state):
    """(the run's state, its RunLogger): `state` as given, or as the checkpoint `ckpt` stored it (the same
    dataclass); the config is saved once the checkpoint fits, so a refused resume leaves the folder alone."""
    if ckpt is not None:
        state = type(state)(**load_checkpoint(accelerator, ckpt, changed))
        logger.info("resumed from %s at update %d", ckpt, state.update)
    if accelerator.is_main_process:  # the run's settings from now on
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return state, RunLogger(out, accelerator.is_main_process, cfg.train.log_with, state.update)
