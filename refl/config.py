"""The ReFL experiment config: `model`, `lora`, `step`, `train`, `reward`, `data`.

`train` is the shared training vocabulary (runkit.config.TrainSettings) with ReFL's defaults and its
validation settings. Batch sizes: `train.batch_size` prompts per micro-batch per process,
`train.gradient_accumulation` micro-batches per update, so one update sees
batch_size x gradient_accumulation x processes prompts (ImageReward: 2 x 4 x 8 = 64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from refl.components import ModelConfig
from refl.lora import LoraConfig
from refl.step import StepConfig
from runkit.config import ConfigError, TrainSettings, check_mixed_precision


@dataclass
class RewardSourceConfig:
    """Where ReFL's reward comes from: a trained critic (or an ensemble), a standard reward model, a mix."""

    # Reward kind, a key of REWARDS: "critic" (a Social Reward checkpoint or open_clip name), a standard
    # reward model ("pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "clipscore"; weights from
    # `standard`), "mix" (the weighted sum in `mix`), or the synthetic "brightness" / "contrast" rewards
    # for smoke tests.
    kind: str = "critic"
    # Critic checkpoint directory (reward/ training output) or open_clip "name[:pretrained]"; frozen. A list
    # of several makes an ensemble (reward.ensemble.CriticEnsemble): reward = members' mean - ensemble_penalty
    # x their population std, the uncertainty-penalised objective of Coste et al., ICLR 2024.
    critic: str | list[str] = "toy-clip"
    # Ensemble only: weight k of the members' standard deviation subtracted from their mean, in reward units
    # per std (0 = the plain mean of the members).
    ensemble_penalty: float = 0.0
    # Weights of the standard reward models: kind -> argument of its spec, i.e. a local path (file layouts
    # in reward/standard/files.py), a hub id, or "" for the default hub id; options follow commas, e.g.
    # {hpsv2: weights/HPS_v2_compressed.pt, aesthetic: "weights,backbone=ViT-L-14:weights/vit-l-14.bin"}.
    standard: dict[str, str] = field(default_factory=dict)
    # kind "mix": reward = sum of weight * term, term -> weight, terms being REWARDS kinds other than "mix",
    # e.g. {critic: 1.0, hpsv2: 0.5}. The terms keep their own scales (HPS v2 ~0.25, PickScore ~20), so a
    # weight is an exchange rate. Each term is logged unweighted as train/reward/<term>.
    mix: dict[str, float] = field(default_factory=dict)


@dataclass
class ReflDataConfig:
    # Training prompts: a .txt file (one per line), a .parquet/.csv with a `prompt_column`; or None to use
    # `prompts`.
    prompts_file: str | None = None
    # Column holding prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # Inline prompt list, used when prompts_file is None.
    prompts: list[str] = field(default_factory=lambda: ["a red square on a blue background", "a green circle",
                                                        "a yellow triangle", "a purple square at the top"])
    # Denoising-regulariser pool (used when step.reg_weight > 0), built once at start: this many
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
class ReflTrainConfig(TrainSettings):
    """The shared training vocabulary with ReFL's defaults, plus what validation draws."""

    # Run folder: config.yaml, metrics.jsonl, tb/, samples/, checkpoints/, lora/, training_curve.png.
    output_dir: str = "runs/refl"
    # Prompts per micro-batch, per process.
    batch_size: int = 2
    # Micro-batches per optimizer update, per process.
    gradient_accumulation: int = 4
    # AdamW weight decay of the LoRA tensors.
    weight_decay: float = 1e-2
    # Gradient clipping on the global LoRA gradient norm; 0 disables.
    max_grad_norm: float = 1.0
    # Recompute activations in backward instead of storing them, each forward of the gradient path once
    # (same gradients, about one more forward of it; refl.step.GRAD_METHODS, chosen by benchmarks/):
    #   refl: its UNet call with gradient whole, the VAE decoder's mid and up blocks, the critic's blocks
    #   draft: each of its K UNet calls with gradient whole, the VAE decoder's blocks, the critic's blocks
    #   draft_lv: each of its n UNet passes whole, the VAE decoder's blocks, the critic's blocks
    #   alignprop: each UNet call from the cut to the end whole, the VAE decoder's blocks, the critic's blocks
    # The denoising regulariser's UNet call (step.reg_weight > 0) is recomputed as the method's calls are.
    # SD 3 / FLUX: the transformer's blocks instead of its whole calls (refl.step.checkpointing_for).
    # Needed at 512 px: docs/memory.md has what each method then takes (SD 3.5 / FLUX.1: docs/flow.md).
    gradient_checkpointing: bool = True
    # Encode every training, validation and regulariser prompt once at start, then free the text encoders
    # for the rest of the run (refl.text_embeddings); null = on for SD 3 / FLUX, whose T5-XXL encoder alone
    # has 4.7B parameters (9.5 GB in bf16), off for the UNet families. The cost: the prompt set is fixed at
    # start (a prompt outside it is refused) and the embeddings stay in CPU memory (bf16: FLUX 4 MiB a
    # prompt, SD 3 2.7 MiB); text-encoder LoRA (lora.train_text_encoder) needs it off.
    precompute_text_embeddings: bool | None = None
    # Folder keeping precomputed text embeddings across runs and resumes: one file per prompt set and model,
    # named by a hash of the prompts' text and of the text encoders' output on a probe prompt (content, not
    # paths); "" = encode at every start.
    text_embeddings_cache: str = ""
    # Log scalars every this many updates.
    log_every: int = 1
    # Sample the validation prompts every this many updates and at the end (0: only at the end).
    validate_every: int = 25
    # Also validate before the first update (update 0, the base model: the LoRA starts as a no-op), so the
    # curves start where the base stands and train.select_by can keep the base when no update beats it.
    validate_at_start: bool = True
    # Save a resumable checkpoint every this many updates and at the end (0: only at the end).
    checkpoint_every: int = 50
    # Fixed validation prompts shown in the image grid; empty = no validation.
    validation_prompts: list[str] = field(default_factory=lambda: ["a red square on a blue background",
                                                                   "a green circle", "a yellow triangle"])
    # Validation images per prompt.
    validation_images_per_prompt: int = 2
    # Seed of the validation noise (the same images every time, so grids compare across updates).
    validation_seed: int = 1234
    # Sampler steps for validation images.
    validation_num_inference_steps: int = 40
    # Classifier-free guidance scale for validation images (1 = off).
    validation_guidance_scale: float = 1.0
    # Held-out judges of the validation images, evaluator specs of reward.evaluators (e.g. "clip:tiny-clip",
    # "critic:runs/critic_b", "oracle:", "hpsv2:weights/HPS_v2_compressed.pt"); each judge's mean score is
    # logged as eval/heldout/<spec> beside eval/reward. They never reach the gradient. On the command line
    # quote a spec that ends in ':' (YAML reads `oracle:` as a mapping): --set 'train.select_by="oracle:"'.
    heldout_evaluators: list[str] = field(default_factory=list)
    # Evaluator spec that selects the LoRA (a judge; added to heldout_evaluators if not listed): the
    # validation with its highest mean score saves <output_dir>/lora_best/. "" = no selection.
    select_by: str = ""
    # Stop once the select_by judge has dropped this many validations in a row (see refl/guard.py for
    # what a drop is: the judge falls while eval/reward rises); 0 = never stop early.
    stop_after_drops: int = 0

    def check(self) -> None:
        """The shared invariants, and what validation draws."""
        super().check()
        if self.validation_images_per_prompt < 1 or self.validation_num_inference_steps < 1:
            raise ConfigError(f"train.validation_images_per_prompt and train.validation_num_inference_steps "
                              f"must be >= 1, got {self.validation_images_per_prompt} and "
                              f"{self.validation_num_inference_steps}")
        if not 0 <= self.validation_guidance_scale < math.inf:
            raise ConfigError(f"train.validation_guidance_scale must be >= 0 and finite (1 = off), got "
                              f"{self.validation_guidance_scale}")


@dataclass
class ReflConfig:
    # Keys renamed after a release: old dotted key -> new key (refused with the new name for one release).
    RENAMED: ClassVar[dict[str, str]] = {}
    model: ModelConfig = field(default_factory=ModelConfig)  # the Stable Diffusion base
    lora: LoraConfig = field(default_factory=LoraConfig)  # the adapters that train
    step: StepConfig = field(default_factory=StepConfig)  # the reward-gradient step
    train: ReflTrainConfig = field(default_factory=ReflTrainConfig)  # optimisation, logging, checkpoints
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)  # what is maximised
    data: ReflDataConfig = field(default_factory=ReflDataConfig)  # training prompts

    def __post_init__(self):
        self.train.check()
        if self.train.max_updates < 1:
            raise ValueError("train.max_updates must be >= 1")
        check_guard_config(self.train)
        if self.lora.rank < 1 or not self.lora.alpha > 0 or not 0 <= self.lora.dropout < 1:
            raise ValueError(f"lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1, got rank "
                             f"{self.lora.rank}, alpha {self.lora.alpha}, dropout {self.lora.dropout}")
        critics = [self.reward.critic] if isinstance(self.reward.critic, str) else self.reward.critic
        if not critics or not all(critics):
            raise ValueError("reward.critic needs a checkpoint or a non-empty list of them, got "
                             f"{self.reward.critic!r}")
        if self.train.precompute_text_embeddings and self.lora.train_text_encoder:
            raise ValueError("train.precompute_text_embeddings computes the text embeddings once, but "
                             "lora.train_text_encoder trains the text encoders; set one of them to false")
        if self.reward.ensemble_penalty < 0:
            raise ValueError(f"reward.ensemble_penalty must be >= 0, got {self.reward.ensemble_penalty}")
        # The weights of the objective's terms: a negative or NaN one trained the wrong way, or silently not
        # at all. A mix weight may be negative (a term to push down), never NaN or infinite.
        weights = {"step.kl_weight": self.step.kl_weight, "step.reg_weight": self.step.reg_weight,
                   "step.eta": self.step.eta}
        bad = [f"{k}={v}" for k, v in weights.items() if not 0 <= v < math.inf]
        bad += [f"reward.mix.{k}={v!r}" for k, v in self.reward.mix.items()
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be finite numbers, and >= 0 but for a mix weight "
                             "(0 = the term is off)")
        if self.step.reg_weight > 0 and self.data.reg_pool_size < 1:
            raise ValueError(f"step.reg_weight={self.step.reg_weight} needs data.reg_pool_size >= 1 (the "
                             f"regulariser's examples), got {self.data.reg_pool_size}")


def check_guard_config(t: ReflTrainConfig) -> None:
    """Selection and early stopping act at validations: without validation prompts they never could, which
    is a config error (the run would silently train without its guard). Too few validations for them to
    matter is only warned about at start-up (refl.guard.warn_if_too_few_validations): a shortened smoke
    run of a real experiment config (e.g. --set train.max_updates=2) should still run."""
    if t.stop_after_drops < 0:
        raise ValueError(f"train.stop_after_drops must be >= 0, got {t.stop_after_drops}")
    if t.stop_after_drops > 0 and not t.select_by:
        raise ValueError("train.stop_after_drops needs train.select_by: the judge whose drops stop the run")
    if (t.select_by or t.stop_after_drops) and not t.validation_prompts:
        raise ValueError("train.select_by / train.stop_after_drops act at validations, but "
                         "train.validation_prompts is empty (no validation happens); add validation prompts")


@dataclass
class GenerateConfig:
    """What `social-refl-generate` draws: images of a base model with an optional LoRA, one folder of PNGs and
    generations.jsonl."""

    # The base model (model.name: a diffusers directory, hub id or preset; model.vae: another VAE, e.g. an
    # fp16-safe SDXL VAE for mixed_precision fp16).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name=""))
    # LoRA folder in diffusers format (a ReFL run's lora/ or lora_best/); "" = the base model alone.
    lora: str = ""
    # Multiplier of the LoRA update (1 = as trained).
    lora_scale: float = 1.0
    # Prompts file: .txt (one per line), or .parquet/.csv with a `prompt_column`.
    prompts_file: str = ""
    # Column holding the prompts in a parquet/csv file.
    prompt_column: str = "prompt"
    # Images per prompt; image k of every prompt uses seed + k.
    images_per_prompt: int = 4
    # Seed of the first image of each prompt.
    seed: int = 0
    # Sampler steps per image.
    num_inference_steps: int = 40
    # Classifier-free guidance scale (1 = off).
    guidance_scale: float = 7.5
    # Sampler: "model" (the one the model ships, as its stock pipeline samples: SDXL base's Euler, SD 3's and
    # FLUX's flow Euler), or "ddim" / "ddpm" / "flow_euler" (refl.sampling.SCHEDULERS).
    scheduler: str = "model"
    # Critic that scores each image into generations.jsonl: a critic folder or open_clip name; "" = none.
    critic: str = ""
    # Images per pipeline call, per process; the images do not depend on it.
    batch_size: int = 8
    # "no" (fp32), "fp16" (GPU only) or "bf16": the weights' and activations' dtype while sampling.
    mixed_precision: str = "no"
    # "cuda", "cpu", ...; "" = CUDA when there is one.
    device: str = ""
    # Output folder: NNNN_KK.png per image and generations.jsonl.
    output_dir: str = ""
    # Replace the images of an earlier generation in output_dir (refused without it).
    overwrite: bool = False
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        if self.images_per_prompt < 1 or self.batch_size < 1 or self.num_inference_steps < 1:
            raise ValueError(f"images_per_prompt, batch_size and num_inference_steps must be at least 1, got "
                             f"{self.images_per_prompt}, {self.batch_size} and {self.num_inference_steps}")
        if not 0 <= self.guidance_scale < math.inf or not -math.inf < self.lora_scale < math.inf:
            raise ValueError(f"guidance_scale must be >= 0 and lora_scale a number, both finite; got "
                             f"{self.guidance_scale} and {self.lora_scale}")
        check_mixed_precision(self.mixed_precision, "mixed_precision")


@dataclass
class ExportConfig:
    """What `social-refl-export-lora` writes: a saved LoRA as one file for other tools, optionally
    uploaded."""

    # LoRA folder saved by ReFL training (its lora/ or lora_best/).
    lora: str = ""
    # Key layout of the exported file, a key of refl.export.EXPORT_LAYOUTS: "kohya" (UNet LoRAs:
    # AUTOMATIC1111, ComfyUI, Forge) or "diffusers" (SD 3 / FLUX LoRAs: ComfyUI, Forge); "" = the one the
    # tools load for the LoRA's model.
    layout: str = ""
    # The exported .safetensors file; "" = inside the LoRA folder.
    output_file: str = ""
    # Replace an existing output_file (refused without it).
    overwrite: bool = False
    # Also upload the folder (weights, model card, export) to this Hub model repo; "" = no upload.
    push_to_hub: str = ""
    # Create the Hub repo as private.
    private: bool = False
    RENAMED: ClassVar[dict[str, str]] = {}
