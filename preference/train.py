"""The preference-tuning loop: feedback micro-batches -> dpo_step / kto_step -> optimizer on the LoRA,
under accelerate (mixed precision, gradient accumulation, several processes).

As ReFL's loop, the UNet is not DDP-wrapped: the LoRA gradients are averaged across processes after the
micro-batches (refl.lora_training.all_reduce_grads), which leaves the reference model's no-grad passes
(adapters off) outside DDP's hooks. Every random draw of a micro-batch (VAE sample, noise, timesteps) comes
from a generator seeded by (seed, update, micro-batch, rank), the LoRA's dropout masks from the global RNG
seeded per micro-batch, and the data order from the micro-batch's position (preference/data.py), so
`--resume latest` replays the run exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from preference.card import model_card
from preference.config import PreferenceConfig
from preference.data import FeedbackStream
from preference.step import dpo_step, join_reference_point, kto_step
from refl import guard
from refl.components import Checkpointing, SDComponents, local_family
from refl.compute import ComputeMeter, ComputeSpent, compute_of
from refl.lora import save_lora
from refl.lora_training import (
    all_reduce_grads,
    apply_update,
    check_resumed_lora,
    due,
    open_run,
    prepare_lora_training,
    validate,
)
from refl.plots import plot_curve
from refl.prompts import seed_for
from refl.sampling import check_scheduler, make_scheduler
from refl.step import NonFiniteLossError
from refl.text_embeddings import precompute_text_embeddings, precompute_wanted
from runkit.checkpoints import find_checkpoint, rewrite_state, save_checkpoint
from runkit.config import changed_settings, check_device_precision
from runkit.files import check_output_dir, paths_relative_to, write_json
from runkit.logs import read_metrics

logger = logging.getLogger(__name__)

# What each method logs as train/<name> (means over the update's micro-batches and processes).
LOGGED = {"dpo": ("loss", "accuracy", "margin", "reward_preferred", "reward_rejected", "error_preferred",
                  "error_rejected"),
          "kto": ("loss", "reward_liked", "reward_not_liked", "reference_point", "liked_fraction")}


@dataclass
class PreferenceState(ComputeSpent):
    """Saved as each checkpoint's state.json, restored on --resume; with what the run has spent so far
    (refl.compute.ComputeSpent)."""

    update: int = 0  # optimizer updates done
    # The last update whose validation ran (-1: none yet); a run resumed from an update's checkpoint that
    # was written before its validation validates that update first.
    validated: int = -1
    bad_rows_skipped: int = 0  # rows met in training that did not decode (on_bad_row=skip), this process


def _micro_batches(components: SDComponents, cfg: PreferenceConfig, batches, update: int, accelerator,
                   state: PreferenceState) -> torch.Tensor:
    """Forward and backward of one update's micro-batches; returns the sums of LOGGED's terms and the
    number of micro-batches that had a good row, (len(LOGGED) + 1,)."""
    t = cfg.train
    rank = accelerator.process_index
    sums = torch.zeros(len(LOGGED[cfg.method]) + 1, device=accelerator.device)  # (K + 1,)

    def reduce_sum(x: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(x, reduction="sum")

    for micro in range(t.gradient_accumulation):
        _, batch = next(batches)
        state.bad_rows_skipped += batch["n_bad"]
        if batch["n_bad"]:
            logger.warning("update %d: skipped %d bad row(s) (data.on_bad_row=skip): %s", update + 1,
                           batch["n_bad"], " | ".join(batch["bad"][:3]))
        if not batch["prompt"]:  # every row bad: no gradient from this micro-batch, the others go on
            if cfg.method == "kto":
                join_reference_point(reduce_sum, accelerator.device)
            continue
        gen = torch.Generator().manual_seed(seed_for(t.seed, update, micro, rank))
        # LoRA dropout draws from the global RNG: seeded by the micro-batch too, so its masks do not depend
        # on what ran before (a validation, a resumption).
        torch.manual_seed(seed_for(t.seed, update, micro, rank, 1))
        with accelerator.autocast():
            flow = {"timestep_density": cfg.timestep_density, "guidance_scale": cfg.guidance_scale}
            if cfg.method == "dpo":
                terms = dpo_step(components, batch, cfg.beta, gen, **flow)
            else:
                terms = kto_step(components, batch, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight,
                                 gen, reduce_sum, **flow)
        if not torch.isfinite(terms["loss"].detach()):
            raise NonFiniteLossError(f"update {update + 1} micro-batch {micro + 1} (rank {rank}): loss is "
                                     f"{terms['loss'].item()}; no update was made. Lower train.lr or beta, "
                                     "or use bf16 instead of fp16")
        accelerator.backward(terms["loss"] / t.gradient_accumulation)
        sums += torch.stack([terms[k].detach().float() for k in LOGGED[cfg.method]] + [torch.ones(())]
                            ).to(sums.device)
    return sums


def _update_metrics(cfg: PreferenceConfig, sums: torch.Tensor, accelerator, grad_norm: float, lr: float,
                    skipped: bool) -> dict[str, float]:
    """Means over the good micro-batches of every process (a collective: every rank runs it)."""
    total = accelerator.reduce(sums, reduction="sum")  # (K + 1,)
    metrics = {"train/grad_norm": grad_norm, "train/lr": lr, "train/skipped": float(skipped)}
    if total[-1] > 0:
        metrics.update({f"train/{k}": float(v) for k, v in zip(LOGGED[cfg.method], total[:-1] / total[-1])})
    return metrics


def _validation_pending(cfg: PreferenceConfig, state: PreferenceState) -> bool:
    t = cfg.train
    now = t.validate_at_start if state.update == 0 else due(t.validate_every, state.update, t.max_updates)
    return bool(t.validation_prompts) and state.validated < state.update and now


def _save(accelerator, out: Path, state: PreferenceState, cfg: PreferenceConfig, components: SDComponents,
          card) -> Path:
    return save_checkpoint(accelerator, out, vars(state).copy(), cfg.train.checkpoints_keep,
                           write_files=lambda folder: save_lora(components, folder / "lora",
                                                                card=card(state.update)))


def train(cfg: PreferenceConfig, command: str | None = None) -> dict:
    """Run (or resume) preference tuning; returns paths and final metrics. `command` (how the run was
    started) goes into the model card of every saved LoRA."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t = cfg.train
    if not cfg.data.train:
        raise ValueError("data.train is empty: set it to the feedback (e.g. --set data.train=pairs.parquet)")
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    check_device_precision(accelerator.device, t.mixed_precision, "train.mixed_precision")
    out = Path(t.output_dir)
    check_output_dir(out, "train.output_dir")
    ckpt = find_checkpoint(out, t.resume)  # before anything is written: a refusal leaves the folder alone
    changed = changed_settings(out / "config.yaml", cfg) if ckpt is not None else []
    check_resumed_lora(ckpt, cfg.lora)  # what is read after the model loads, checked before it does
    guard.check_judges(t)
    rank, world = accelerator.process_index, accelerator.num_processes
    # The feedback is indexed (every file read, every row checked) before the model loads.
    feed = FeedbackStream(cfg.method, cfg.data, t.seed, t.batch_size, rank, world)
    family = local_family(cfg.model.name)
    if family is not None:  # the validation sampler fits the family: refused now, not after loading
        try:
            check_scheduler(cfg.scheduler, family, cfg.model.name)
        except ValueError as err:
            raise ValueError(f"scheduler: {err}") from None
    checkpointing = Checkpointing(unet="blocks" if t.gradient_checkpointing else "none")
    components, params, optimizer, lr_sched = prepare_lora_training(cfg.model, cfg.lora, t, checkpointing,
                                                                    accelerator)
    feed.set_image_size(components.image_size)
    try:  # a family not known before loading (e.g. a hub id not cached yet): refused now, not at validation
        make_scheduler(cfg.scheduler, components)
    except ValueError as err:
        raise ValueError(f"scheduler: {err}") from None
    # The feedback's prompts (KTO's mismatched pairs among them) and validation's are the run's fixed set.
    prompts = feed.dataset.prompts() + list(t.validation_prompts)
    if precompute_wanted(components, t.precompute_text_embeddings, prompts):
        precompute_text_embeddings(components, prompts, t.text_embeddings_cache)
    logger.info("%s on %d %s; %d processes, %d per update (= %d x %d accumulation x %d processes), "
                "%d updates",
                cfg.method, len(feed.dataset), "pairs" if cfg.method == "dpo" else "images", world,
                t.batch_size * t.gradient_accumulation * world, t.batch_size, t.gradient_accumulation, world,
                t.max_updates)
    judges = guard.create_judges(t, accelerator.device) if accelerator.is_main_process else {}
    state, run_logger = open_run(cfg, accelerator, out, ckpt, changed, PreferenceState())

    def card(updates: int) -> str:
        return model_card(cfg, updates, read_metrics(out / "metrics.jsonl"), command, components.family)

    batches = feed.batches(state.update * t.gradient_accumulation)
    bar = tqdm(total=t.max_updates, initial=state.update, disable=not accelerator.is_main_process,
               desc=cfg.method.upper())
    metrics: dict[str, float] = {}
    checkpoint = ckpt  # the checkpoint of update state.update, when there is one
    meter = ComputeMeter(components.denoiser)
    while True:
        if _validation_pending(cfg, state):
            if accelerator.is_main_process:
                with meter.validating(state):
                    evals = validate(components, t, cfg.scheduler, state.update, out, run_logger, judges)
                run_logger.scalars(state.update, evals)
                if checkpoint is not None:
                    state.validated = state.update
                    rewrite_state(checkpoint, vars(state).copy())
            state.validated = state.update
            accelerator.wait_for_everyone()
        if state.update >= t.max_updates:
            break
        sums = _micro_batches(components, cfg, batches, state.update, accelerator, state)
        all_reduce_grads(params, accelerator)
        current_lr = lr_sched.get_last_lr()[0]
        grad_norm, skipped = apply_update(accelerator, optimizer, lr_sched, params, t.max_grad_norm,
                                          f"update {state.update + 1}")
        state.update += 1
        meter.update_done(state, accelerator)
        bar.update(1)
        metrics = _update_metrics(cfg, sums, accelerator, grad_norm, current_lr, skipped)
        if due(t.log_every, state.update, t.max_updates):
            run_logger.scalars(state.update, metrics)
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4g}")
        checkpoint = None
        if due(t.checkpoint_every, state.update, t.max_updates):
            checkpoint = _save(accelerator, out, state, cfg, components, card)
    bar.close()
    meter.close()

    result = {"output_dir": str(out), "updates": state.update, "bad_rows_skipped_indexing": feed.n_bad_rows,
              "duplicate_pairs": feed.n_duplicates, **metrics, "compute": compute_of(state)}
    if accelerator.is_main_process:
        result["lora"] = str(save_lora(components, out / "lora", card=card(state.update)))
        curve = plot_curve(out / "metrics.jsonl", out / "training_curve.png",
                           first="train/accuracy" if cfg.method == "dpo" else "train/reward_liked")
        result["curve"] = str(curve) if curve else None
        write_json(out / "result.json", paths_relative_to(result, out))  # the folder may be copied or moved
    run_logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
