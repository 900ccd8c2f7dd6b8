"""The critic trainer's experiment config: `model` (which CLIP, from which weights, which layers train),
`data` (the preference pairs), `loss` and `train`.

`train` is the shared training vocabulary (runkit.config.TrainSettings) with the critic's defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from reward.data.pairs import check_duplicate_policy
from reward.losses import LOSSES
from reward.model import CriticConfig
from runkit.config import TrainSettings


@dataclass
class CriticDataConfig:
    # Training pairs in one of the formats of reward.data (reward/data/formats.py): a parquet / csv / json(l)
    # file, a folder or glob of parquet / arrow shards (e.g. a Pick-a-Pic v2 download's data/train-*.parquet),
    # or a `datasets` save_to_disk folder. Streamed: rows are read a row group at a time.
    train: str = ""
    # Held-out pairs (same kinds of source); empty = hold out `val_fraction` of the training prompts.
    val: str = ""
    # Fraction of prompts (not pairs) held out when `val` is empty, chosen by a hash of the prompt.
    val_fraction: float = 0.1
    # Pair format, a key of reward.data.PAIR_FORMATS (social | pickapic | ranked) or auto (detected from the
    # columns).
    format: str = "auto"
    # keep | drop | half | auto (keep ties if the loss handles them, else drop).
    tie_policy: str = "auto"
    # error = stop at the first bad row; skip = drop bad rows and log how many and which. Labels, prompts and
    # image paths are checked for every row before training (no image decoded); images when they are read.
    on_bad_row: str = "error"
    # A pair that repeats an earlier one (same prompt, same preferred and rejected image, same label):
    # drop = counted, logged and left out (a file holding every row five times would otherwise weigh those
    # pairs five times and narrow the held-out intervals as if they were new evidence); keep = counted,
    # logged and kept (e.g. one pair judged alike by several annotators, each judgement meant to count).
    duplicate_pairs: str = "drop"
    # Decode every training image once before training so a corrupt file fails now, not mid-run
    # (one full pass over the data; at scale run social-refl-check-pairs once instead). Bad rows met
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
class CriticTrainConfig(TrainSettings):
    """The shared training vocabulary (runkit.config.TrainSettings) with the critic's defaults."""

    # Run folder: config.yaml, metrics.jsonl, tb/, checkpoints/, critic/ (the final critic), metrics.json.
    output_dir: str = "runs/reward"
    # Optimizer updates to stop after (global); 0 = run all `epochs`.
    max_updates: int = 0
    # Pairs per process per micro-batch.
    batch_size: int = 32
    # AdamW learning rate (Social Reward's script: 3e-5).
    lr: float = 3e-5
    # Clip the global grad norm to this; 0 = no clipping (as in the paper).
    max_grad_norm: float = 0.0
    # Recompute the open_clip towers' blocks in the backward pass: less activation memory, ~1/3 more
    # compute. For large critics (ViT-L-14 at 224 px) and large batches.
    gradient_checkpointing: bool = False
    # Passes over the training pairs.
    epochs: int = 10
    # After training, fit the affine score calibration on the held-out images (mean 0, std 1).
    calibrate: bool = True
    # The final critic is the one of the validation with the best held-out pairwise accuracy (the earliest on
    # a tie), not the last update's (as transformers' load_best_model_at_end); metrics.json names its update.
    # Needs held-out pairs; validate_every sets how finely it can choose.
    keep_best: bool = False


@dataclass
class RewardConfig:
    # Keys renamed after a release: old dotted key -> new key (refused with the new name for one release).
    RENAMED: ClassVar[dict[str, str]] = {}
    model: CriticConfig = field(default_factory=CriticConfig)  # which CLIP, from what, which layers train
    data: CriticDataConfig = field(default_factory=CriticDataConfig)  # the preference pairs
    loss: LossConfig = field(default_factory=LossConfig)
    train: CriticTrainConfig = field(default_factory=CriticTrainConfig)  # optimisation, logging, checkpoints

    def __post_init__(self):
        if self.loss.name not in LOSSES:
            raise ValueError(f"loss.name={self.loss.name!r}; choose one of {', '.join(LOSSES)}")
        self.train.check()
        if self.train.keep_best and not self.data.val and self.data.val_fraction <= 0:
            raise ValueError("train.keep_best chooses by held-out accuracy: set data.val or "
                             "data.val_fraction > 0")
        if self.data.shuffle_row_groups < 1:
            raise ValueError("data.shuffle_row_groups must be >= 1")
        check_duplicate_policy(self.data.duplicate_pairs, "data.duplicate_pairs")
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1) (a fraction of the prompts; 0 = no "
                             f"held-out prompts), got {self.data.val_fraction}")
        if self.data.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = decode in the main process), got "
                             f"{self.data.num_workers}")
        if not 0 <= self.loss.margin < math.inf:
            raise ValueError(f"loss.margin must be >= 0 and finite (a negative margin leaves every triplet "
                             f"satisfied, so nothing trains), got {self.loss.margin}")
        if self.train.max_updates == 0 and self.train.epochs < 1:
            raise ValueError(f"train.epochs={self.train.epochs} with train.max_updates=0 trains nothing; set "
                             "train.epochs >= 1 or train.max_updates")


@dataclass
class ValidateConfig:
    """What `social-refl-validate-reward` measures: a critic's pairwise accuracy on held-out pairs, beside
    baselines."""

    # Held-out pairs file (parquet / csv / jsonl in a format of reward.data.PAIR_FORMATS).
    pairs: str = ""
    # The critic measured: a critic folder or open_clip NAME[:PRETRAINED] (also spelled critic:DIR or
    # clip:NAME, as evaluator specs spell them).
    critic: str = ""
    # Models measured beside it: critics, open_clip names, or standard reward specs KIND:PATH (e.g.
    # hpsv2:weights/HPS_v2_compressed.pt); [] = the critic's own backbone; ["none"] = no baseline.
    baselines: list[str] = field(default_factory=list)
    # Pairs per scoring call, per process.
    batch_size: int = 64
    # error = stop at the first bad row; skip = drop bad rows and count them.
    on_bad_row: str = "error"
    # A pair that repeats an earlier one (same prompt, images and label): drop = counted and left out, so
    # the interval is that of the distinct pairs; keep = counted and scored as often as it appears.
    duplicate_pairs: str = "drop"
    # The JSON report (the table goes beside it as .md); "" = validation.json in the critic's folder.
    output_file: str = ""
    # "cuda", "cpu", ...; "" = CUDA when there is one.
    device: str = ""
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row={self.on_bad_row!r}; choose error or skip")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_duplicate_policy(self.duplicate_pairs, "duplicate_pairs")


@dataclass
class CheckPairsConfig:
    """What `social-refl-check-pairs` does: decode every image of a pairs set once, write a clean copy and a
    report of the bad rows."""

    # Pairs file, shard folder, glob (quoted) or datasets save_to_disk folder.
    source: str = ""
    # The clean pairs file to write (.parquet).
    output_file: str = ""
    # The JSON report of the bad rows; "" = <output_file>.report.json.
    report_file: str = ""
    # Pair format, a key of reward.data.PAIR_FORMATS, or auto (detected from the columns).
    format: str = "auto"
    # Processes decoding images.
    num_workers: int = 0
    # Rows whose every pair repeats an earlier pair (same prompt, images and label) are listed in the report
    # either way; drop = left out of the clean copy; keep = copied.
    duplicate_pairs: str = "drop"
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        check_duplicate_policy(self.duplicate_pairs, "duplicate_pairs")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = decode in the main process), got "
                             f"{self.num_workers}")
