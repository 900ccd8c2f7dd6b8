"""The preference-tuning experiment config: `method` (dpo | kto), `beta` and KTO's weights, the flow families'
`timestep_density` and `guidance_scale`, `model` (any family), `lora`, `data` (the feedback) and `train`.

`train` is ReFL's train section (the shared runkit.config.TrainSettings vocabulary plus the validation
settings and held-out judges) with defaults for preference tuning. Batch sizes: `train.batch_size` pairs
(dpo) or images (kto) per micro-batch per process, `train.gradient_accumulation` micro-batches per update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from refl.components import ModelConfig
from refl.config import ReflTrainConfig
from refl.lora import LoraConfig
from refl.sampling import MODEL_SCHEDULER, SCHEDULERS
from refl.step import FLOW_TIMESTEP_DENSITIES
from reward.data.pairs import check_duplicate_policy

METHODS = ("dpo", "kto")


@dataclass
class PreferenceDataConfig:
    # The feedback. dpo: preference pairs in a format of reward.data.PAIR_FORMATS (the pairs the critic
    # trainer reads); kto: liked / not-liked images in a format of reward.data.LABEL_FORMATS (prompt, image,
    # label). A parquet / csv / json(l) file, a folder or glob of parquet / arrow shards, or a `datasets`
    # save_to_disk folder; streamed a row group at a time.
    train: str = ""
    # dpo: a key of reward.data.PAIR_FORMATS (social | pickapic | ranked); kto: of LABEL_FORMATS (labelled);
    # or auto (detected from the columns).
    format: str = "auto"
    # dpo's tied pairs: drop, keep (label 0.5: the loss is symmetric in the two images) or half (an ordinary
    # pair at half weight).
    tie_policy: str = "drop"
    # error = stop at the first bad row; skip = drop bad rows and log how many and which (as the critic's).
    on_bad_row: str = "error"
    # A pair (dpo) or labelled image (kto) that repeats an earlier one (same prompt, images and label): drop
    # = counted, logged and left out; keep = counted, logged and trained on as often as it appears.
    duplicate_pairs: str = "drop"
    # DataLoader worker processes per process; images are decoded and resized in them.
    num_workers: int = 0
    # Row groups mixed together by the shuffle (per process); each worker holds up to this many (+1).
    shuffle_row_groups: int = 4


@dataclass
class PreferenceTrainConfig(ReflTrainConfig):
    """ReFL's train section (shared vocabulary, validation, judges) with preference tuning's defaults."""

    # Run folder: config.yaml, metrics.jsonl, tb/, samples/, checkpoints/, lora/, training_curve.png.
    output_dir: str = "runs/preference"
    # Pairs (dpo) or images (kto) per micro-batch, per process.
    batch_size: int = 4
    # Micro-batches per optimizer update, per process.
    gradient_accumulation: int = 1
    # Peak learning rate of the LoRA tensors.
    lr: float = 1e-5
    # Recompute the UNet's blocks in backward (diffusers' own checkpointing): less activation memory, about
    # one more UNet forward per micro-batch. Needed for SDXL at 1024 px on 24 GB.
    gradient_checkpointing: bool = False
    # Sample the validation prompts every this many updates and at the end (0: only at the end).
    validate_every: int = 100
    # Save a resumable checkpoint every this many updates and at the end (0: only at the end).
    checkpoint_every: int = 100


@dataclass
class PreferenceConfig:
    # Keys renamed after a release: old dotted key -> new key (refused with the new name for one release).
    RENAMED: ClassVar[dict[str, str]] = {}
    # dpo (Diffusion-DPO on preference pairs) or kto (Diffusion-KTO on liked / not-liked images).
    method: str = "dpo"
    # Strength of the tie to the base model in the implicit reward -(beta / 2) * (tuned error - base error),
    # errors as per-element means (preference/objectives.py). 5000 is Diffusion-DPO's SD 1.5 / SDXL setting
    # (~850k pairs). With a small dataset (hundreds of pairs, the toy world's) the LoRA overfits in few
    # updates: raise beta (e.g. 10000-20000) to keep it nearer the base, or lower train.lr.
    beta: float = 5000.0
    # kto: weight lambda_D of the liked images' term; KTO advises lambda_D * n_liked / (lambda_U *
    # n_not_liked) in [1, 4/3], so with fewer liked than not-liked images raise this.
    desirable_weight: float = 1.0
    # kto: weight lambda_U of the not-liked images' term.
    undesirable_weight: float = 1.0
    # SD 3 / FLUX only: how the denoising errors' sigma is drawn, the density of u in (0, 1) that picks the
    # training scheduler's sigma (refl.step.flow_training_timesteps): logit_normal (sigmoid of N(0, 1)) or
    # uniform. logit_normal is how these models were trained (the SD 3 paper's best rectified-flow sampler,
    # the default of diffusers' SD 3 / FLUX LoRA trainers), as Diffusion-DPO draws its timesteps the way SD
    # was trained (uniform over the DDPM schedule, which the UNet families keep whatever this says).
    timestep_density: str = "logit_normal"
    # FLUX only: the value of its guidance embedding in the tuned and the reference model's denoising errors
    # (3.5, the default of diffusers' FLUX LoRA trainer); the other families' errors are one conditional
    # pass, unguided, as Diffusion-DPO's. Validation images use train.validation_guidance_scale.
    guidance_scale: float = 3.5
    # Sampler of the validation images, a key of refl.sampling.SCHEDULERS (ddim, ddpm for the UNet families;
    # flow_euler for SD 3 / FLUX) or model (the one the model ships).
    scheduler: str = "ddim"
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model (and reference), any family
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters that train
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)  # the feedback
    train: PreferenceTrainConfig = field(default_factory=PreferenceTrainConfig)  # optimisation, validation

    def __post_init__(self):
        self.train.check()
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")
        if self.method == "kto" and self.train.batch_size < 2:
            raise ValueError("method=kto needs train.batch_size >= 2: its reference point pairs each image "
                             "with another image's prompt of the same micro-batch")
        if self.scheduler not in (*SCHEDULERS, MODEL_SCHEDULER):
            raise ValueError(f"scheduler={self.scheduler!r}; choose one of {sorted(SCHEDULERS)} or "
                             f"{MODEL_SCHEDULER}")
        if self.timestep_density not in FLOW_TIMESTEP_DENSITIES:
            raise ValueError(f"timestep_density={self.timestep_density!r}; choose one of "
                             f"{', '.join(FLOW_TIMESTEP_DENSITIES)}")
        if not 0 <= self.guidance_scale < math.inf:
            raise ValueError(f"guidance_scale must be >= 0 and finite, got {self.guidance_scale}")
        if self.train.max_updates < 1:
            raise ValueError("train.max_updates must be >= 1")
        if self.train.select_by or self.train.stop_after_drops:
            raise ValueError("train.select_by / train.stop_after_drops are ReFL's guards (a drop is the "
                             "judge falling while the training reward rises; preference tuning has no "
                             "reward): leave them empty and compare the validations' eval/heldout/ curves")
        if self.train.precompute_text_embeddings and self.lora.train_text_encoder:
            raise ValueError("train.precompute_text_embeddings computes the text embeddings once, but "
                             "lora.train_text_encoder trains the text encoders; set one of them to false")
        if self.lora.rank < 1 or not self.lora.alpha > 0 or not 0 <= self.lora.dropout < 1:
            raise ValueError(f"lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got rank "
                             f"{self.lora.rank}, alpha {self.lora.alpha}, dropout {self.lora.dropout}")
        if self.data.shuffle_row_groups < 1:
            raise ValueError("data.shuffle_row_groups must be >= 1")
        check_duplicate_policy(self.data.duplicate_pairs, "data.duplicate_pairs")
        if self.data.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = decode in the main process), got "
                             f"{self.data.num_workers}")
