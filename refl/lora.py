"""LoRA on the denoiser (the UNet; SD 3's and FLUX's transformer) and optionally the text encoders whose LoRA
the family's stock pipeline loads (SD 1.x / 2.x: CLIP; SDXL and SD 3: both CLIPs; FLUX: CLIP-L; T5 in
neither) through peft, saved in diffusers format.

Only LoRA parameters train; they stay fp32 even when the frozen base runs in fp16/bf16, because
Adam updates of size lr * 1 are below fp16's resolution for weights near 1. The saved files carry
`lora_alpha` as adapter metadata: without it `load_lora_weights` assumes alpha = rank and a LoRA
trained with alpha != rank reloads at the wrong scale, silently. A saved folder can carry a model card
(README.md, refl/card.py) beside the weights.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from refl.components import SDComponents, pipeline_class
from runkit.files import atomic_dir

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"


@dataclass
class LoraConfig:
    # LoRA rank r (the inner dimension of the low-rank update).
    rank: int = 4
    # LoRA alpha; the update is scaled by alpha / rank.
    alpha: float = 4.0
    # Dropout on the LoRA branch input (0 disables; ReFL peers use 0).
    dropout: float = 0.0
    # Denoiser modules that get adapters; None = the model family's DEFAULT_TARGETS (the UNet's attention
    # projections; a flow transformer's attention projections of both streams and its feed-forward layers).
    target_modules: list[str] | None = None
    # Also put adapters on the text encoders' attention projections: those whose LoRA the family's stock
    # pipeline loads (SDXL and SD 3: both CLIPs; FLUX: CLIP-L; never T5).
    train_text_encoder: bool = False
    # Text-encoder modules that get adapters when train_text_encoder is true.
    text_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])

    def __post_init__(self):
        if self.train_text_encoder and not self.text_target_modules:
            raise ValueError("train_text_encoder is true but text_target_modules is empty; name the text "
                             "encoder's modules (e.g. [q_proj, k_proj, v_proj, out_proj])")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty; leave it null for the model family's default")


# The UNet's attention projections; SD 3's and FLUX's joint blocks' attention of the image and text streams
# and both feed-forward layers, and FLUX's single-stream blocks' attention, MLP input and output projection
# (proj_out: inside the blocks only, the transformer's final output layer has the same name).
_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_JOINT_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                  "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                  "ff_context.net.0.proj", "ff_context.net.2"]
DEFAULT_TARGETS: dict[str, list[str]] = {"sd": _UNET_TARGETS, "sdxl": _UNET_TARGETS, "sd3": _JOINT_TARGETS,
                                         "flux": _JOINT_TARGETS + ["proj_mlp", "proj_out"]}
# Where a flow transformer's default targets are looked for: its joint and single-stream blocks.
FLOW_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def _matches(name: str, suffixes: list[str]) -> bool:
    """peft's rule for a module name in a target_modules list: the name itself or a dotted suffix of it."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def check_target_modules(cfg: LoraConfig, names: list[str], where: str) -> None:
    """Every module name or suffix the user listed in `lora.target_modules` must match a module of the
    denoiser (`names`, its module names): peft refuses only a list of which nothing matches, so one typo
    among several trained fewer modules than asked, without a word."""
    if cfg.target_modules is None:
        return
    unmatched = [s for s in cfg.target_modules if not any(_matches(name, [s]) for name in names)]
    if unmatched:
        raise ValueError(f"lora.target_modules {unmatched} match no module of {where} (a module name or its "
                         "dotted suffix, e.g. attn.to_q); fix or remove them, or leave lora.target_modules "
                         "null for the family's default")


def reaches_output(denoiser: torch.nn.Module, name: str) -> bool:
    """Whether the module `name` of the denoiser can change its output. Not so: the text-stream queries
    (add_q_proj) of a joint block that keeps no text output (`context_pre_only`, SD 3's last block): its
    image stream reads the text's keys and values only."""
    if name.endswith("add_q_proj"):
        attention = denoiser.get_submodule(name.rsplit(".", 1)[0])
        return not getattr(attention, "context_pre_only", False)
    return True


def target_modules(cfg: LoraConfig, components: SDComponents) -> list[str]:
    """The denoiser modules that get adapters: `cfg.target_modules`, or the family's default. For a flow
    transformer the full module names, each one that reaches the output (`reaches_output`; the default
    targets inside its blocks only, FLOW_BLOCKS); for a UNet the suffixes, as peft matches them."""
    given = cfg.target_modules is not None
    suffixes = list(cfg.target_modules) if given else DEFAULT_TARGETS[components.family]
    denoiser = components.denoiser
    check_target_modules(cfg, [name for name, _ in denoiser.named_modules() if name],
                         f"the {components.family} {components.denoiser_name}")
    if not components.is_flow:
        return suffixes
    names = [name for name, _ in denoiser.named_modules() if name and _matches(name, suffixes)
             and (given or name.startswith(FLOW_BLOCKS))]
    dead = [name for name in names if not reaches_output(denoiser, name)]
    if dead:
        logger.info("LoRA: no adapter on %s (they cannot change the %s's output)", ", ".join(dead),
                    components.denoiser_name)
    return [name for name in names if name not in dead]


def _peft_config(rank: int, alpha: float, dropout: float, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=list(targets))


def _adapt(module: torch.nn.Module, config, key: str, where: str) -> None:
    """`module.add_adapter(config)`; module names that match nothing are one line naming `key` (peft's own
    text names no setting)."""
    try:
        module.add_adapter(config)
    except ValueError as err:
        if "not found in the base model" not in str(err):
            raise
        raise ValueError(f"{key} {sorted(config.target_modules)} match no module of {where}") from None


def add_lora(components: SDComponents, cfg: LoraConfig, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze every base weight, attach adapters, upcast them to fp32; returns the trainable params.
    `seed` (the run's train.seed) fixes the Gaussian LoRA-A initialisation (B starts at zero, so the
    tuned model starts as the base)."""
    for module in components.modules().values():
        module.requires_grad_(False)
    torch.manual_seed(seed)
    targets = target_modules(cfg, components)
    if not targets:
        raise ValueError(f"lora.target_modules={cfg.target_modules}: no module of the "
                         f"{components.denoiser_name} matches (a module name or its dotted suffix, e.g. "
                         "attn.to_q)")
    _adapt(components.denoiser, _peft_config(cfg.rank, cfg.alpha, cfg.dropout, targets),
           "lora.target_modules", f"the {components.family} denoiser; leave it null for the family's default "
           f"{DEFAULT_TARGETS[components.family]}")
    modules = [components.denoiser]
    if cfg.train_text_encoder:
        for name, encoder in lora_text_encoders(components).items():
            _adapt(encoder, _peft_config(cfg.rank, cfg.alpha, cfg.dropout, cfg.text_target_modules),
                   "lora.text_target_modules", f"{name} (e.g. q_proj, k_proj, v_proj, out_proj)")
            modules.append(encoder)
    params = []
    for module in modules:
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                params.append(p)
            elif p.requires_grad:  # add_adapter leaves base weights frozen; check, never assume
                raise RuntimeError(f"base weight {name} requires grad after add_adapter")
    if not params:
        raise RuntimeError(f"no LoRA adapters attached: target modules {targets} matched nothing")
    logger.info("LoRA r=%d alpha=%g: %d tensors, %.3fM trainable parameters", cfg.rank, cfg.alpha,
                len(params), sum(p.numel() for p in params) / 1e6)
    return params


def lora_text_encoders(components: SDComponents) -> dict[str, torch.nn.Module]:
    """The text encoders a LoRA may adapt, by their diffusers names: those the family's stock pipeline loads
    LoRA weights for (its loader's list of modules), so `load_lora_weights` reproduces the tuned model."""
    loadable = pipeline_class(components.family)._lora_loadable_modules
    return {name: m for name, m in components.text_encoders().items() if name in loadable}


def trainable_parameters(components: SDComponents) -> list[torch.nn.Parameter]:
    return [p for m in components.modules().values() for p in m.parameters() if p.requires_grad]


def _adapted_text_encoders(components: SDComponents) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in components.text_encoders().items()
            if any("lora_" in n for n, _ in m.named_parameters())}


def _lora_modules(components: SDComponents) -> dict[str, torch.nn.Module]:
    """The modules carrying adapters, by their diffusers names (unet or transformer, text_encoder,
    text_encoder_2)."""
    return {components.denoiser_name: components.denoiser, **_adapted_text_encoders(components)}


def lora_state(components: SDComponents) -> dict[str, torch.Tensor]:
    """peft-format LoRA tensors of every adapted module, prefixed by module name (for checkpoints)."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for prefix, module in _lora_modules(components).items():
        for k, v in get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME).items():
            out[f"{prefix}.{k}"] = v.detach().float().cpu().contiguous()
    return out


def load_lora_state(components: SDComponents, state: dict[str, torch.Tensor]) -> None:
    """Inverse of `lora_state` into already-attached adapters (resume); fails on any mismatch."""
    from peft.utils import set_peft_model_state_dict

    adaptable = {components.denoiser_name: components.denoiser, **components.text_encoders()}
    for prefix, module in adaptable.items():
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if not part:
            continue
        result = set_peft_model_state_dict(module, part, adapter_name=ADAPTER_NAME)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA checkpoint does not fit the {prefix}: unexpected "
                             f"{result.unexpected_keys[:5]}")
        lora_missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if lora_missing:
            raise ValueError(f"LoRA checkpoint does not fit the {prefix}: missing {lora_missing[:5]}")


def save_lora(components: SDComponents, directory: str | os.PathLike, card: str | None = None) -> Path:
    """Write the LoRA in diffusers format (`pipe.load_lora_weights(directory)` of the stock pipeline of the
    base's family reads it), with alpha as adapter metadata, and `card` as README.md when given,
    atomically: a temp dir beside the target, then a rename. UNet and text-encoder LoRA keys are converted
    to diffusers' naming as their loaders expect; the transformer loaders read peft's keys as they are."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    for name, module in _lora_modules(components).items():
        state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(module).items()}
        kwargs[f"{name}_lora_layers"] = (state if name == "transformer"
                                         else convert_state_dict_to_diffusers(state))
        # Dropout is a training setting: a loader that injects adapters after the pipeline's eval() (as
        # load_lora_weights does) would otherwise draw random dropout masks at inference.
        kwargs[f"{name}_lora_adapter_metadata"] = {**module.peft_config[ADAPTER_NAME].to_dict(),
                                                   "lora_dropout": 0.0}
    with atomic_dir(directory) as tmp:
        pipeline_class(components.family).save_lora_weights(tmp, safe_serialization=True, **kwargs)
        if card is not None:
            (tmp / MODEL_CARD).write_text(card, encoding="utf-8")
    return directory


MODEL_CARD = "README.md"  # the model card beside the weights, as diffusers' training scripts write it


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes


def check_lora_dir(directory: str | os.PathLike) -> Path:
    """The weights file of a saved LoRA folder; FileNotFoundError naming the folder and the fix otherwise.
    Cheap: commands call it before any work."""
    directory = Path(directory)
    if directory.is_file():
        raise NotADirectoryError(f"LoRA {directory} is a file; name the folder holding it (the lora/ or "
                                 f"lora_best/ folder of a ReFL run, which holds {LORA_WEIGHTS})")
    if not directory.is_dir():
        raise FileNotFoundError(f"LoRA folder {directory} does not exist (the lora/ or lora_best/ folder of "
                                "a ReFL run)")
    weights = directory / LORA_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA folder {directory} holds no {LORA_WEIGHTS} (ReFL writes it into the "
                                "lora/ and lora_best/ folders of a run); point at one of those")
    check_lora_file(weights)
    return weights


# The modules a diffusers-layout LoRA file's keys start with (save_lora / save_lora_weights), and the names
# its down (rank x in) and up (out x rank) matrices go by in the spellings diffusers' loader reads.
LORA_KEY_PREFIXES = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")
LORA_DOWN = (".lora_A.", ".lora.down.", ".lora_linear_layer.down.")
LORA_UP = (".lora_B.", ".lora.up.", ".lora_linear_layer.up.")


def check_lora_file(weights: Path) -> dict[str, int]:
    """The weights file of a LoRA folder, read from its header alone (no tensor loaded): readable
    safetensors, keys of the diffusers layout, every adapter of rank > 0. Each failure is one line naming the
    file and the fix. Returns each down matrix's rank by key."""
    from safetensors import SafetensorError, safe_open

    fix = "point at the lora/ or lora_best/ folder of a ReFL run, or copy the folder again"
    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
            ranks = {k: f.get_slice(k).get_shape()[0] for k in keys if any(d in k for d in LORA_DOWN)}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"LoRA weights {weights} cannot be read as safetensors ({err}): the file is cut "
                         f"short or not a LoRA; {fix}") from None
    if not keys:
        raise ValueError(f"LoRA weights {weights} hold no tensors; {fix}")
    foreign = [k for k in keys
               if not k.startswith(LORA_KEY_PREFIXES) or not any(m in k for m in LORA_DOWN + LORA_UP)]
    if foreign:
        hint = (" (a kohya-layout file: load it in the tool it was made for, or convert it with diffusers' "
                "load_lora_weights and save_lora_weights)" if foreign[0].startswith("lora_") else "")
        raise ValueError(f"LoRA weights {weights}: key {foreign[0]!r} is not of the diffusers LoRA layout "
                         f"(<{'|'.join(p.rstrip('.') for p in LORA_KEY_PREFIXES)}>.<module>.lora_A|lora_B"
                         f".weight or .lora.down|up.weight){hint}; {fix}")
    empty = [k for k, rank in ranks.items() if rank < 1]
    if empty:
        raise ValueError(f"LoRA weights {weights}: adapter {empty[0]!r} has rank 0; {fix}")
    return ranks


def start_from_lora(components: SDComponents, directory: str | os.PathLike, cfg: LoraConfig) -> None:
    """Copy a saved LoRA folder (what `save_lora` writes) into the adapters `add_lora` attached with `cfg`, so
    training continues from it: the model then draws what the stock pipeline with that LoRA draws. Refused,
    naming the setting to change, when the folder's adapters do not fit `cfg` (rank, alpha, text encoders,
    target modules)."""
    from safetensors import safe_open

    directory = Path(directory)
    weights = check_lora_dir(directory)
    with safe_open(str(weights), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    state = {}
    for key, value in saved.items():  # diffusers' spellings back to peft's (save_lora converts UNet keys)
        for spelling in LORA_DOWN + LORA_UP:
            key = key.replace(spelling, ".lora_A." if spelling in LORA_DOWN else ".lora_B.")
        state[key] = value.float().to(components.denoiser.device)
    for module in {k.split(".", 1)[0] for k in state}:
        saved_rank, saved_alpha = metadata.get(f"{module}.r"), metadata.get(f"{module}.lora_alpha")
        if (saved_rank, saved_alpha) not in ((None, None), (cfg.rank, cfg.alpha)):
            raise ValueError(f"LoRA {directory}: its {module} adapters have rank {saved_rank}, alpha "
                             f"{saved_alpha}; set lora.rank={saved_rank} and lora.alpha={saved_alpha} to "
                             "start from it")
    if any(k.startswith("text_encoder") for k in state) and not cfg.train_text_encoder:
        raise ValueError(f"LoRA {directory} holds text-encoder adapters; set lora.train_text_encoder=true to "
                         "start from it")
    try:
        load_lora_state(components, state)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise ValueError(f"LoRA {directory} does not fit this run's adapters ({first}): it was trained on "
                         "another base model or with other lora.target_modules; start from a LoRA of this "
                         "base with its own lora settings") from None
    logger.info("starting from the LoRA in %s", directory)


def load_lora_into(pipe, directory: str | os.PathLike, adapter_name: str = "refl") -> None:
    """Load a diffusers-format LoRA folder (what `save_lora` writes) into a stock pipeline, as adapter
    `adapter_name`; an error names the folder and what it should hold."""
    from safetensors import safe_open

    directory = Path(directory)
    weights = check_lora_dir(directory)
    with safe_open(str(weights), "pt") as f:
        text_keys = any(k.startswith("text_encoder.") for k in f.keys())
    # diffusers warns that a LoRA without text-encoder weights has none for the text encoder; here that is
    # known and intended (train.train_text_encoder off), so exactly that warning is dropped.
    # And a LoRA that does not fit is one line below, not diffusers' logged copy of each size mismatch first.
    with _dropping(logging.getLogger("diffusers.loaders.lora_base"), "No LoRA keys associated to",
                   active=not text_keys), \
            _dropping(logging.getLogger("diffusers.loaders.peft"),
                      f"Loading {adapter_name} was unsuccessful"):
        try:
            pipe.load_lora_weights(str(directory), adapter_name=adapter_name)
        except (RuntimeError, ValueError) as err:
            mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), None)
            if mismatch is None:
                raise
            raise ValueError(f"LoRA {directory} does not fit this base model: it was trained on another base "
                             f"model ({mismatch}); load it with the model it was trained on") from None


@contextmanager
def _dropping(log: logging.Logger, message_start: str, active: bool = True):
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(message_start)

    if active:
        log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
