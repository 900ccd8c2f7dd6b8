"""ReFL LoRA training loop: prompts -> reward_step -> optimizer on the LoRA, under accelerate.

The UNet is not wrapped in DDP: after the micro-batches the LoRA gradients are averaged across
processes explicitly (`refl.lora_training.all_reduce_grads`), which keeps the many no-grad UNet calls and
the multi-call gradient methods (DRaFT-K, AlignProp) away from DDP's once-per-iteration hooks. Every random
draw of an update (prompts, noise, cut) comes from a generator seeded by (seed, update, micro-batch, rank), so
`--resume latest` replays the run exactly.

Several processes on CPU: `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...`
(`accelerate launch --cpu` starts a single process unless MPI is set up).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from refl import guard
from refl.card import model_card
from refl.components import DTYPES, SDComponents
from refl.compute import ComputeMeter, ComputeSpent, compute_of
from refl.config import ReflConfig, ReflTrainConfig
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
from refl.prompts import prompts_for, seed_for, training_prompts, warn_if_truncated
from refl.reg_pool import build_reg_pool
from refl.rewards import build_reward, check_reward
from refl.step import (
    RewardFn,
    checkpointing_for,
    ignored_knobs,
    reward_step,
    validate_step_config,
)
from refl.text_embeddings import precompute_text_embeddings, precompute_wanted
from runkit.checkpoints import find_checkpoint, rewrite_state, save_checkpoint
from runkit.config import changed_settings, check_device_precision
from runkit.files import check_output_dir, paths_relative_to, write_json
from runkit.logs import RunLogger, read_metrics

logger = logging.getLogger(__name__)


@dataclass
class TrainState(ComputeSpent):
    """Saved as each checkpoint's state.json (flat, JSON-able), restored on --resume; with what the run has
    spent so far (refl.compute.ComputeSpent)."""

    update: int = 0  # optimizer updates done
    # train.select_by (refl/guard.py): the judge's best mean score so far (None before the first
    # validation) and the update whose LoRA scored it (saved as lora_best/).
    best_score: float | None = None
    best_update: int = 0
    # train.stop_after_drops: drops in a row so far, and the previous validation's judge score and
    # eval/reward that the next validation is compared with (None before the first validation).
    drops: int = 0
    prev_score: float | None = None
    prev_reward: float | None = None
    # The update the run stopped at because the judge dropped stop_after_drops times (None: it did not).
    stopped_early_at: int | None = None
    # The last update whose validation ran (-1: none yet). An update's checkpoint is written before its
    # validation (a crash there loses no training), so a run resumed from it validates that update first.
    validated: int = -1


def _micro_batches(components, cfg: ReflConfig, prompts, reward_fn, reg_pool, update: int, accelerator):
    """Forward and backward of one update's micro-batches; returns each loss term's values."""
    t = cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes
    terms = defaultdict(list)
    for micro in range(t.gradient_accumulation):
        # Global prompt stream position of this rank's micro-batch: every prompt of an epoch once.
        start = ((update * t.gradient_accumulation + micro) * world + rank) * t.batch_size
        batch = prompts_for(prompts, t.seed, start, t.batch_size)
        gen = torch.Generator().manual_seed(seed_for(t.seed, update, micro, rank))
        reg_batch = None
        if reg_pool is not None:
            idx = torch.randint(0, len(reg_pool[1]), (t.batch_size,), generator=gen)
            reg_batch = (reg_pool[0][idx], [reg_pool[1][i] for i in idx.tolist()])
        with accelerator.autocast():
            step_out = reward_step(components, batch, reward_fn, cfg.step, gen, reg_batch=reg_batch,
                                   step_name=f"update {update + 1} micro-batch {micro + 1} (rank {rank})")
        accelerator.backward(step_out["loss"] / t.gradient_accumulation)
        for k, v in step_out.items():
            terms[k].append(v.detach().float())
    return terms


def _update_metrics(terms, accelerator, grad_norm: float, lr: float, skipped: bool) -> dict[str, float]:
    """Means over micro-batches and processes (a collective: every rank runs it)."""
    means = {k: torch.stack(v).mean().to(accelerator.device) for k, v in terms.items()}
    means = {k: accelerator.reduce(v, reduction="mean").item() for k, v in means.items()}
    metrics = {"train/loss": means.pop("loss"), "train/reward": means.pop("reward"),
               "train/grad_norm": float(grad_norm), "train/lr": lr, "train/skipped": float(skipped)}
    metrics.update({f"train/{k}": v for k, v in means.items()})
    return metrics


Card = Callable[[int], str]  # the model card of the LoRA after that many updates (refl.card)


def _select(components: SDComponents, state: TrainState, evals: dict[str, float], t: ReflTrainConfig,
            out: Path, card: Card) -> bool:
    """Main process: fold a validation into the selection, save lora_best/ on a new best; returns
    whether the run should stop (the select_by judge dropped stop_after_drops times in a row)."""
    score = evals[guard.HELDOUT_PREFIX + t.select_by]
    if guard.track(state, score, evals["eval/reward"]):
        # atomic: a crash never leaves half a lora_best
        save_lora(components, out / "lora_best", card=card(state.update))
        logger.info("update %d: %s = %.4g, the best so far: saved lora_best", state.update, t.select_by,
                    score)
    if state.drops:
        logger.info("update %d: %s dropped while eval/reward rose, %d time(s) in a row", state.update,
                    t.select_by, state.drops)
    return t.stop_after_drops > 0 and state.drops >= t.stop_after_drops


def _save(accelerator, out: Path, state: TrainState, t: ReflTrainConfig, components: SDComponents,
          card: Card) -> Path:
    return save_checkpoint(accelerator, out, vars(state).copy(), t.checkpoints_keep,
                           write_files=lambda folder: save_lora(components, folder / "lora",
                                                                card=card(state.update)))


def _validation_pending(t: ReflTrainConfig, state: TrainState) -> bool:
    now = t.validate_at_start if state.update == 0 else due(t.validate_every, state.update, t.max_updates)
    return bool(t.validation_prompts) and state.validated < state.update and now


def _validate_and_select(components: SDComponents, cfg: ReflConfig, reward_fn: RewardFn, state: TrainState,
                         out: Path, run_logger: RunLogger, judges: dict, accelerator,
                         checkpoint: Path | None, card: Card, meter: ComputeMeter) -> Path | None:
    """Validate update `state.update` (main process), fold it into the selection, stop early if the guard
    says so; the update's checkpoint then records it. Returns that checkpoint."""
    t = cfg.train
    stop = False
    if accelerator.is_main_process:
        with meter.validating(state):
            evals = validate(components, t, cfg.step.scheduler, state.update, out, run_logger, judges,
                             reward_fn)
        run_logger.scalars(state.update, evals)
        if t.select_by:
            stop = _select(components, state, evals, t, out, card)
    if t.select_by:
        stop = guard.share(state, stop, accelerator)
    state.validated = state.update
    if stop:
        state.stopped_early_at = state.update
        logger.warning("stopped early at update %d: %s dropped %d validations in a row while eval/reward "
                       "rose; lora_best/ is update %d", state.update, t.select_by, state.drops,
                       state.best_update)
    if checkpoint is None and stop:
        return _save(accelerator, out, state, t, components, card)
    if checkpoint is not None and accelerator.is_main_process:
        rewrite_state(checkpoint, vars(state).copy())
    return checkpoint


def train(cfg: ReflConfig, reward_fn: RewardFn | None = None, command: str | None = None) -> dict:
    """Run (or resume) ReFL LoRA training; returns paths and final metrics. reward_fn overrides cfg.reward;
    `command` (how the run was started) goes into the model card of every saved LoRA."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t = cfg.train
    validate_step_config(cfg.step)
    for line in ignored_knobs(cfg.step):  # a config written for another method: legal, but say so
        logger.warning(line)
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    check_device_precision(accelerator.device, t.mixed_precision, "train.mixed_precision")
    out = Path(t.output_dir)
    check_output_dir(out, "train.output_dir")
    ckpt = find_checkpoint(out, t.resume)  # before anything is written: a refusal leaves the folder alone
    changed = changed_settings(out / "config.yaml", cfg) if ckpt is not None else []
    # Every input read after the model loads (minutes on SDXL), checked before it does.
    check_resumed_lora(ckpt, cfg.lora)
    if reward_fn is None:
        check_reward(cfg.reward)
    guard.check_judges(t)
    world = accelerator.num_processes
    per_update = t.batch_size * t.gradient_accumulation * world
    logger.info("processes %d, prompts per update %d (= %d per micro-batch x %d accumulation x %d "
                "processes), %d updates, %d prompts seen", world, per_update, t.batch_size,
                t.gradient_accumulation, world, t.max_updates, per_update * t.max_updates)
    prompts = training_prompts(cfg.data)
    components, params, optimizer, lr_sched = prepare_lora_training(
        cfg.model, cfg.lora, t,
        lambda family: checkpointing_for(cfg.step.method, t.gradient_checkpointing, family), accelerator)
    if accelerator.is_main_process:
        warn_if_truncated(prompts, components.tokenizer, "data")
    reward_fn = reward_fn or build_reward(cfg.reward, accelerator.device, DTYPES[t.mixed_precision],
                                          components.checkpointing.critic)
    guard.warn_if_too_few_validations(t)
    # Validation runs on the main process only, and so do its judges.
    judges = guard.create_judges(t, accelerator.device) if accelerator.is_main_process else {}
    state, run_logger = open_run(cfg, accelerator, out, ckpt, changed, TrainState())
    # From here on (the regulariser's pool of base renders included), what the run spends is the updates'.
    meter = ComputeMeter(components.denoiser)
    reg_pool = build_reg_pool(components, cfg, prompts, accelerator) if cfg.step.reg_weight > 0 else None
    if precompute_wanted(components, t.precompute_text_embeddings):
        precompute_text_embeddings(components, [*prompts, *t.validation_prompts,
                                                *(reg_pool[1] if reg_pool is not None else [])],
                                   t.text_embeddings_cache)

    def card(updates: int) -> str:
        return model_card(cfg, updates, read_metrics(out / "metrics.jsonl"), command, components.family)

    bar = tqdm(total=t.max_updates, initial=state.update, disable=not accelerator.is_main_process,
               desc="ReFL")
    metrics: dict[str, float] = {}
    checkpoint = ckpt  # the checkpoint of update state.update, when there is one
    while True:
        if _validation_pending(t, state):
            checkpoint = _validate_and_select(components, cfg, reward_fn, state, out, run_logger, judges,
                                              accelerator, checkpoint, card, meter)
        if state.update >= t.max_updates or state.stopped_early_at is not None:
            break
        terms = _micro_batches(components, cfg, prompts, reward_fn, reg_pool, state.update, accelerator)
        all_reduce_grads(params, accelerator)
        current_lr = lr_sched.get_last_lr()[0]
        grad_norm, skipped = apply_update(accelerator, optimizer, lr_sched, params, t.max_grad_norm,
                                          f"update {state.update + 1}")
        state.update += 1
        meter.update_done(state, accelerator)
        bar.update(1)
        metrics = _update_metrics(terms, accelerator, grad_norm, current_lr, skipped)
        if due(t.log_every, state.update, t.max_updates):
            run_logger.scalars(state.update, metrics)
            bar.set_postfix(reward=f"{metrics['train/reward']:.4f}", loss=f"{metrics['train/loss']:.4g}")
        checkpoint = None
        if due(t.checkpoint_every, state.update, t.max_updates):
            checkpoint = _save(accelerator, out, state, t, components, card)
    bar.close()
    meter.close()

    result = {"output_dir": str(out), "updates": state.update, "stopped_early_at": state.stopped_early_at,
              **metrics, "compute": compute_of(state)}
    if t.select_by:
        result.update({"lora_best": str(out / "lora_best"), "best_update": state.best_update,
                       "best_score": state.best_score})
    if accelerator.is_main_process:
        result["lora"] = str(save_lora(components, out / "lora", card=card(state.update)))
        curve = plot_curve(out / "metrics.jsonl", out / "training_curve.png",
                           best_update=state.best_update if t.select_by else None)
        result["curve"] = str(curve) if curve else None
        write_json(out / "result.json", paths_relative_to(result, out))  # the folder may be copied or moved
    run_logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
