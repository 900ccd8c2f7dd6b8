"""Fine-tune a Social Reward critic on preference pairs, single process or `accelerate launch`.

The critic and the loss are wrapped in one `nn.Module` that `accelerator.prepare` sees, so under
DDP every trainable parameter (a learnable logit scale included) has its gradient synchronised.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reward.config import CriticDataConfig, CriticTrainConfig, LossConfig, RewardConfig
from reward.data import DataError, EmptySplitError, PairShards, PairShardSampler, collate_pairs
from reward.evaluate import evaluate_pairs, score_pairs
from reward.losses import create_loss
from reward.model import SocialReward, create_critic, is_critic_dir, load_critic_weights
from runkit.checkpoints import find_checkpoint, init_weights, load_checkpoint, rewrite_state, save_checkpoint
from runkit.config import changed_settings, check_device_precision, save_config
from runkit.files import check_output_dir, write_json
from runkit.logs import RunLogger
from runkit.optim import build_optimizer
from runkit.schedules import build_lr_scheduler

logger = logging.getLogger(__name__)

BEST_DIR = "critic_best"  # train.keep_best: the best validation's critic so far, inside the run folder


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


@dataclass
class LoopState:
    update: int = 0  # optimizer updates done
    epoch: int = 0  # current pass over the training pairs
    batches_done: int = 0  # micro-batches of this epoch already consumed (skipped on resume)
    best_update: int = -1  # train.keep_best: the update of the best validation so far (-1: none yet)
    best_accuracy: float = -1.0  # its held-out pairwise accuracy


def train(cfg: RewardConfig) -> dict:
    """Run (or, with train.resume, resume) training; returns the final metrics. Writes under
    train.output_dir."""
    tc = cfg.train
    out = Path(tc.output_dir)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision,
                              gradient_accumulation_steps=tc.gradient_accumulation)
    check_device_precision(accelerator.device, tc.mixed_precision, "train.mixed_precision")
    set_seed(tc.seed)
    check_output_dir(out, "train.output_dir")
    ckpt = find_checkpoint(out, tc.resume)  # before anything is written: a refusal leaves the folder alone
    changed = changed_settings(out / "config.yaml", cfg) if ckpt is not None else []

    # train.init_from: an earlier critic's weights, its calibration too (found before the model is built)
    start = init_weights(tc.init_from, "critic", is_critic_dir, "critic") if tc.init_from else None
    critic = create_critic(cfg.model)
    if start is not None:
        load_critic_weights(critic, start)
        logger.info("starting from the critic in %s", start)
    critic.set_grad_checkpointing(tc.gradient_checkpointing)
    loss_fn = create_loss(cfg.loss.name, **_loss_kwargs(cfg.loss))
    if not cfg.data.train:
        raise ValueError("data.train is empty: set it to a pairs file (e.g. --set data.train=pairs.parquet)")
    # `indexed`: what the indexes of both sets dropped or counted before training (the same in every process).
    train_set, val_set, indexed = _datasets(cfg.data, critic.image_size,
                                            getattr(loss_fn, "handles_ties", False))
    if cfg.data.check_images:
        n_bad = check_all_images(train_set, tc.batch_size, cfg.data.num_workers)
        logger.info("data.check_images: every training image decodes (%d bad row(s) skipped)", n_bad)
    sampler = PairShardSampler(train_set, tc.batch_size, seed=tc.seed, world=accelerator.num_processes,
                               shuffle_blocks=cfg.data.shuffle_row_groups)
    # accelerate deals the interleaved batches out, one per process in turn: each process loads only
    # its own (and so reads only its own row groups).
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_pairs,
                        num_workers=cfg.data.num_workers)
    module = CriticWithLoss(critic, loss_fn)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tc)
    updates_per_epoch = math.ceil(sampler.batches_per_process() / tc.gradient_accumulation)
    total = tc.max_updates or updates_per_epoch * tc.epochs
    scheduler = build_lr_scheduler(tc.lr_schedule, optimizer, tc.warmup_updates, total)
    # The LR scheduler is stepped by hand once per optimizer update (a prepared one steps once per
    # process), and registered so the checkpoints carry it.
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)
    logger.info("%s, %d processes; critic %s (%s): %d of %d parameters train (mode %s); %d train pairs, %d "
                "val pairs; global batch %d; %d optimizer updates per epoch, %d in total",
                accelerator.distributed_type, accelerator.num_processes, cfg.model.model_name,
                cfg.model.pretrained,
                sum(p.numel() for p in params), sum(p.numel() for p in critic.parameters()),
                cfg.model.training_mode, len(train_set), len(val_set) if val_set is not None else 0,
                tc.batch_size * accelerator.num_processes * tc.gradient_accumulation, updates_per_epoch,
                total)

    state = LoopState()
    if ckpt is not None:
        state = LoopState(**load_checkpoint(accelerator, ckpt, changed))
        logger.info("resumed from %s at update %d (epoch %d, batch %d)", ckpt, state.update, state.epoch,
                    state.batches_done)
    if accelerator.is_main_process:  # once the checkpoint fits: the run's settings from now on
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    run_logger = RunLogger(out, accelerator.is_main_process, tc.log_with, state.update)
    every = {"validate": tc.validate_every or updates_per_epoch,
             "checkpoint": tc.checkpoint_every or updates_per_epoch}
    history, rows, val_set = _run(accelerator, module, optimizer, scheduler, loader, sampler, params,
                                  val_set, tc, state, total, every, run_logger, out)
    run_logger.close()
    return _finish(accelerator, module, val_set, tc, state, history, rows, out, indexed,
                   resumed=ckpt is not None)


def _run(accelerator, module, optimizer, scheduler, loader, sampler, params, val_set, tc: CriticTrainConfig,
         state: LoopState, total: int, every: dict, run_logger: RunLogger, out: Path):
    """The epochs; returns the validation history, the rows this process trained on and skipped ({"good",
    "bad"}) and the validation set (None once it turned out to hold no scorable pair)."""
    history: list[dict] = []
    pbar = tqdm(total=total, initial=state.update, desc="train critic",
                disable=not accelerator.is_local_main_process)
    running: dict[str, float] = {}
    rows = {"good": 0, "bad": 0}
    image_size = accelerator.unwrap_model(module).critic.image_size
    while state.update < total:
        sampler.epoch = state.epoch
        whole_epoch, good_before = state.batches_done == 0, rows["good"]
        epoch_loader = (accelerator.skip_first_batches(loader, state.batches_done) if state.batches_done
                        else loader)
        for batch in epoch_loader:
            rows["bad"] += _report_bad_rows(batch, rows["bad"], state)
            rows["good"] += len(batch["prompt"])
            state.batches_done += 1
            if not batch["prompt"]:  # every row of this micro-batch was bad (on_bad_row=skip)
                if accelerator.num_processes == 1:
                    continue  # the update takes the next micro-batch instead
                # Every DDP process must run its backward (the gradient all-reduce waits for all of them):
                # this one contributes a stand-in pair with its loss scaled to 0, so its gradient is zero
                # and the update averages the others' (diluted by 1/processes, as a short batch would be).
                _step(accelerator, module, optimizer, scheduler, params,
                      _stand_in_batch(image_size, accelerator.device), tc, state, loss_scale=0.0)
            else:
                terms = _step(accelerator, module, optimizer, scheduler, params, batch, tc, state)
                for k, v in terms.items():
                    running[k] = running.get(k, 0.0) + float(v.detach())
                running["_n"] = running.get("_n", 0) + 1
            if not accelerator.sync_gradients:
                continue
            state.update += 1
            pbar.update(1)
            last = state.update == total
            if (state.update % tc.log_every == 0 or last) and running:
                _log_train(run_logger, scheduler, state, running, pbar)
                running = {}
            saved = None
            if state.update % every["checkpoint"] == 0 or last:  # before validation, which may fail
                saved = _save(accelerator, module, out, state, tc)
            if state.update % every["validate"] == 0 or last:
                val_set = _validate(accelerator, module, val_set, state, run_logger, history, last, out,
                                    tc.keep_best, rows)
                if saved is not None and tc.keep_best and accelerator.is_main_process:
                    rewrite_state(saved, vars(state).copy())  # a resume from it knows this validation's best
            if last:
                break
        else:
            if whole_epoch:
                _refuse_an_epoch_of_bad_rows(accelerator, rows["good"] - good_before, rows["bad"], state)
            state.epoch += 1
            state.batches_done = 0
            continue
        break
    pbar.close()
    return history, rows, val_set


def _step(accelerator, module, optimizer, scheduler, params, batch, tc: CriticTrainConfig,
          state: LoopState, loss_scale: float = 1.0) -> dict:
    """One micro-batch forward and backward (of the loss times `loss_scale`); the optimizer steps when
    gradients sync. Returns the loss terms."""
    with accelerator.accumulate(module):
        terms = module(batch["pos"], batch["neg"], batch["prompt"], batch["label"], batch["weight"])
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"loss is {terms['loss'].item()} at update {state.update} (epoch {state.epoch}, batch "
                f"{state.batches_done}); no update was applied. Lower train.lr, use mixed_precision=no or "
                "bf16, or check the data.")
        accelerator.backward(terms["loss"] * loss_scale)
        if accelerator.sync_gradients and tc.max_grad_norm:
            accelerator.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return terms


def _log_train(run_logger: RunLogger, scheduler, state: LoopState, running: dict, pbar) -> None:
    n = running.pop("_n")
    logs = {f"train/{k}": v / n for k, v in running.items()}
    logs["train/lr"] = scheduler.get_last_lr()[0]
    run_logger.scalars(state.update, logs)
    pbar.set_postfix(loss=f"{logs['train/loss']:.4f}")


def _save(accelerator, module, out: Path, state: LoopState, tc: CriticTrainConfig) -> Path:
    critic = accelerator.unwrap_model(module).critic
    return save_checkpoint(accelerator, out, vars(state).copy(), tc.checkpoints_keep,
                           write_files=lambda folder: critic.save_pretrained(folder / "critic"))


def _validate(accelerator, module, val_set, state: LoopState, run_logger: RunLogger, history: list[dict],
              last: bool, out: Path, keep_best: bool = False, rows: dict | None = None):
    """Validate and log (with `keep_best`, a new best is written to out/critic_best and noted in `state`);
    returns the validation set to use from now on: None once it has no scorable pair (every held-out row
    bad, skipped), so training goes on without validation. A crash in the final validation first writes
    the trained critic (uncalibrated), so the run's work is not lost. The held-out pairs skipped as bad
    when decoded go to rows["bad_heldout"] (each validation meets the same ones)."""
    rows = rows if rows is not None else {}
    try:
        metrics = _evaluate(accelerator, module, val_set)
    except EmptySplitError as err:
        rows["bad_heldout"] = max(rows.get("bad_heldout", 0), err.n_bad_rows)
        logger.warning("training without validation from update %d on: %s", state.update, err)
        return None
    except Exception:
        if last and accelerator.is_main_process:
            accelerator.unwrap_model(module).critic.save_pretrained(out / "critic")
            logger.error("the final validation failed; the trained critic (uncalibrated) is in %s",
                         out / "critic")
        raise
    if metrics:
        rows["bad_heldout"] = max(rows.get("bad_heldout", 0), metrics.get("n_bad_rows", 0))
        run_logger.scalars(state.update, {f"eval/{k}": v for k, v in metrics.items() if np.isscalar(v)})
        history.append({"update": state.update, **metrics})
        logger.info("update %d: eval pairwise accuracy %.3f", state.update, metrics["pairwise_accuracy"])
    if metrics and keep_best and metrics["pairwise_accuracy"] > state.best_accuracy:
        state.best_update, state.best_accuracy = state.update, float(metrics["pairwise_accuracy"])
        accelerator.unwrap_model(module).critic.save_pretrained(out / BEST_DIR)
    return val_set


def _report_bad_rows(batch: dict, n_bad_before: int, state: LoopState) -> int:
    """Log a micro-batch's skipped bad rows (while few have been met); returns how many it had."""
    if batch["n_bad"] and n_bad_before <= 5:
        whole = " (the whole micro-batch)" if not batch["prompt"] else ""
        logger.warning("skipped bad row(s)%s at epoch %d, micro-batch %d (data.on_bad_row=skip): %s", whole,
                       state.epoch, state.batches_done, " | ".join(batch["bad"][:5]))
    return batch["n_bad"]


def _refuse_an_epoch_of_bad_rows(accelerator, good: int, bad: int, state: LoopState) -> None:
    """Stop when a whole epoch met no good row in any process: epochs after it would meet none either (a
    single process, skipping every micro-batch, would never reach an update)."""
    if int(accelerator.reduce(torch.tensor([good], device=accelerator.device), reduction="sum").item()) == 0:
        raise DataError(f"every training row met in epoch {state.epoch} was bad ({bad} skipped in this "
                        "process with data.on_bad_row=skip): nothing can be trained; social-refl-check-pairs "
                        "lists why")


def _stand_in_batch(image_size: int, device) -> dict:
    """One neutral pair (grey images, empty prompt) whose loss a process scales to 0 when its micro-batch
    had no good row: it keeps the process in step with the others' collective backward."""
    grey = torch.full((1, 3, image_size, image_size), 0.5, device=device)  # (1, 3, S, S)
    one = torch.ones(1, device=device)  # (1,)
    return {"pos": grey, "neg": grey.clone(), "prompt": [""], "label": one, "weight": one}


def _finish(accelerator, module, val_set, tc: CriticTrainConfig, state: LoopState, history: list[dict],
            rows: dict, out: Path, indexed: dict, resumed: bool = False) -> dict:
    """Calibrate and save the final critic (main process); the metrics every process returns. Bad rows: those
    each process met decoding (summed), those the indexes of the training and held-out sets dropped before
    training (`indexed`, the same in every process; repeated pairs are counted there too) and the held-out
    pairs validation skipped when decoding them (main process). A fresh run in which no process met a good
    row trained nothing, and says so."""
    counts = accelerator.reduce(torch.tensor([rows["good"], rows["bad"]], device=accelerator.device),
                                reduction="sum")
    good_total, bad_total = (int(c) for c in counts.tolist())
    if good_total == 0 and bad_total and not resumed:
        raise DataError(f"every training row met was bad ({bad_total} skipped with data.on_bad_row=skip), "
                        "so nothing was trained; social-refl-check-pairs lists why")
    bad_total += indexed["bad_rows"] + rows.get("bad_heldout", 0)
    if bad_total:
        logger.warning("skipped %d bad row(s) of the training and held-out pairs (data.on_bad_row=skip); "
                       "social-refl-check-pairs lists them all and writes a clean copy", bad_total)
    final: dict = {"update": state.update, "history": history, "bad_rows_skipped": bad_total,
                   "duplicate_pairs": indexed["duplicate_pairs"]}
    critic = accelerator.unwrap_model(module).critic
    chosen = history[-1] if history else None
    if tc.keep_best:
        # The main process validated; every process loads its choice, so the replicas returned stay identical
        # (a multi-node run needs out/ on a shared disk).
        best_update, best_accuracy = broadcast_object_list([state.best_update, state.best_accuracy])
        accelerator.wait_for_everyone()
        if best_update >= 0:
            load_critic_weights(critic, out / BEST_DIR)
            final["selected_update"] = best_update
            chosen = next((h for h in history if h["update"] == best_update),
                          {"update": best_update, "pairwise_accuracy": best_accuracy})
            logger.info("train.keep_best: the final critic is update %d's (held-out accuracy %.3f)",
                        best_update, best_accuracy)
        else:
            logger.warning("train.keep_best: no validation ran, so the final critic is the last update's")
    if accelerator.is_main_process:
        if tc.calibrate and val_set is not None:
            _calibrate(critic, val_set)
        critic.save_pretrained(out / "critic")
        final["eval"] = chosen
        write_json(out / "metrics.json", final)
        logger.info("final critic written to %s", out / "critic")
    accelerator.end_training()
    # In memory only (not in metrics.json): every process's replica, for callers and tests.
    final["critic"] = critic
    return final


def _calibrate(critic: SocialReward, val_set) -> None:
    """Fit the score calibration on the held-out images' raw cosines (whatever calibration the critic
    arrived with: the fitted scores get std 1); skipped, with a warning, when fewer than two score."""
    s_pos, s_neg = score_pairs(critic, val_set, raw=True)
    cosines = np.concatenate([s_pos, s_neg])
    if len(cosines) < 2:
        logger.warning("no held-out pair could be scored: the critic is saved uncalibrated")
        return
    critic.calibrate_(torch.from_numpy(cosines))


def _loss_kwargs(lc: LossConfig) -> dict:
    return {"triplet": {"margin": lc.margin}, "pairwise": {"init_logit_scale": lc.init_logit_scale},
            "pickscore": {"logit_scale": lc.pickscore_logit_scale}}[lc.name]


def _datasets(dc: CriticDataConfig, image_size: int, handles_ties: bool):
    """Streaming train and validation sets (validation keeps ties: evaluation counts them apart), both
    indexed and checked now, before training; and what both indexes counted ({"bad_rows",
    "duplicate_pairs"}, the held-out set's included)."""
    common = dict(fmt=dc.format, on_bad_row=dc.on_bad_row, cache_blocks=dc.shuffle_row_groups + 1,
                  duplicate_pairs=dc.duplicate_pairs)
    train_kw = dict(common, tie_policy=dc.tie_policy, loss_handles_ties=handles_ties)
    if dc.val:
        train_set = PairShards(dc.train, image_size, **train_kw)
        indexed = {"bad_rows": train_set.n_bad_rows, "duplicate_pairs": train_set.n_duplicates}
        val_set = _validation_set(lambda: PairShards(dc.val, image_size, **common, tie_policy="keep"),
                                  indexed)
        if val_set is not None:
            _warn_if_shared(train_set, val_set)
        return train_set, val_set, indexed
    train_set = PairShards(dc.train, image_size, **train_kw, split="train", val_fraction=dc.val_fraction)
    indexed = {"bad_rows": train_set.n_bad_rows, "duplicate_pairs": train_set.n_duplicates}
    if dc.val_fraction <= 0:
        return train_set, None, indexed
    val_set = _validation_set(lambda: PairShards(dc.train, image_size, **common, tie_policy="keep",
                                                 split="val", val_fraction=dc.val_fraction), indexed)
    return train_set, val_set, indexed


def _warn_if_shared(train_set: PairShards, val_set: PairShards) -> None:
    """A held-out set that shares files with the training set measures fit, not generalisation."""
    shared = sorted({Path(f.path).resolve() for f in train_set.reader.shards}
                    & {Path(f.path).resolve() for f in val_set.reader.shards})
    if shared:
        logger.warning("data.val shares %d file(s) with data.train (e.g. %s): its accuracy measures how well "
                       "the critic fits its training pairs, not how it generalises. Hold out other pairs, or "
                       "leave data.val empty to hold out data.val_fraction of the prompts", len(shared),
                       shared[0])


def _validation_set(make, indexed: dict) -> PairShards | None:
    """The held-out set `make()` builds, or None (with a warning; training goes on without validation) when
    it holds no pair with a clear preference: empty, every row bad and skipped, or only ties. Its index's bad
    rows and repeated pairs are added to `indexed` either way."""
    try:
        val_set = make()
    except EmptySplitError as err:
        indexed["bad_rows"] += err.n_bad_rows
        logger.warning("no validation pairs, training without validation: %s", err)
        return None
    indexed["bad_rows"] += val_set.n_bad_rows
    indexed["duplicate_pairs"] += val_set.n_duplicates
    if not (val_set.labels != 0.5).any():
        logger.warning("%s: every held-out pair is a tie, nothing to score; training without validation",
                       val_set.reader.source)
        return None
    return val_set


def check_all_images(dataset: PairShards, batch_size: int, num_workers: int) -> int:
    """Decode every item once (the training path itself); returns the bad rows skipped."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_pairs, num_workers=num_workers)
    return sum(batch["n_bad"] for batch in tqdm(loader, desc="checking images"))


def _evaluate(accelerator: Accelerator, module, val_set) -> dict | None:
    """Pairwise accuracy on the held-out pairs, computed on the main process. A set with no scorable pair
    raises `EmptySplitError` after the barrier, so the other processes are not left waiting."""
    metrics, empty = None, None
    if accelerator.is_main_process and val_set is not None:
        critic = accelerator.unwrap_model(module).critic
        try:
            metrics = evaluate_pairs(critic, val_set)
        except EmptySplitError as err:
            empty = err
    accelerator.wait_for_everyone()
    if empty is not None:
        raise empty
    return metrics
