"""Components from a diffusers directory or a hub model id, and the one entry point `load_components`
that also takes a preset's name.

A directory holds `model_index.json` and one subfolder per component. Its family is its pipeline class,
`_class_name` (FAMILY_PIPELINES; a directory without one is SDXL when it has `text_encoder_2/`, else SD); a
hub id downloads once into the Hugging Face cache as diffusers does (`HF_HUB_OFFLINE=1` reads the cache
only). `ModelConfig.random_weights` builds a directory's (any family: SD 3 / FLUX parts by the classes its
model_index.json names) or a known hub id's architecture from its config files alone (a dry run of a real
config, offline); `ModelConfig.vae` swaps in another VAE (e.g. an fp16-safe SDXL VAE). `build_pipeline`
and `save_pipeline` go the other way, to stock diffusers pipelines.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from refl.components.container import FLOW_FAMILIES, ModelConfig, SDComponents
from refl.components.flow_presets import FLOW_PRESETS, build_flow_preset
from refl.components.presets import (
    ARCHITECTURES,
    HUB_ARCHITECTURES,
    PRESETS,
    build_architecture,
    build_from_configs,
    build_preset,
)
from refl.components.zero_t5 import collapse_zero_t5
from runkit.files import atomic_dir
from runkit.hub import unreachable_advice

logger = logging.getLogger(__name__)

# Each family's stock pipeline class: what build_pipeline returns and what model_index.json names.
FAMILY_PIPELINES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def pipeline_class(family: str):
    """The stock diffusers pipeline class of a family."""
    import diffusers

    return getattr(diffusers, FAMILY_PIPELINES[family])


def _preset_names() -> list[str]:
    return sorted(PRESETS) + sorted(FLOW_PRESETS) + sorted(ARCHITECTURES)


# The parts of a flow family's directory (model_index.json names their classes), in the order they are seeded.
FLOW_PARTS = {"sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                      "tokenizer_2", "tokenizer_3", "scheduler"),
              "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                       "scheduler")}


def random_flow_from_directory(name: str, seed: int, source: str | None = None) -> SDComponents:
    """Seeded random-weight components of an SD 3 / FLUX diffusers directory's architecture, read from its
    model_index.json (each part's class) and each part's config alone: no weight file is opened. The
    tokenizers and the scheduler are the directory's own. Models are built in eval mode, as loading them
    would give them (T5's config has dropout)."""
    import diffusers
    import transformers

    root = Path(name)
    index = _model_index(name, {})
    family = model_family(name, index)
    parts = FLOW_PARTS[family]
    absent = absent_parts(index, family)
    configs = {part: f"{part}/{'scheduler_config' if part == 'scheduler' else 'config'}.json"
               for part in parts if not part.startswith("tokenizer") and part not in absent}
    missing = ([rel for rel in configs.values() if not (root / rel).is_file()]
               + [part for part in parts if part not in index])
    if missing:
        raise FileNotFoundError(f"model.random_weights: {root} lacks {missing} (a diffusers "
                                f"{FAMILY_PIPELINES[family]} directory has model_index.json and "
                                f"{', '.join(p + '/' for p in parts)})")
    built: dict[str, Any] = dict(absent)
    for i, part in enumerate(parts):
        if part in absent:
            continue
        library, class_name = index[part]
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        if part.startswith("tokenizer") or part == "scheduler":
            built[part] = cls.from_pretrained(root, subfolder=part)
            continue
        torch.manual_seed(seed + i)  # each part on its own seed: one changing never shifts the others
        if library == "diffusers":
            built[part] = cls.from_config(cls.load_config(root, subfolder=part)).eval()
        else:
            built[part] = cls(cls.config_class.from_pretrained(root / part)).eval()
    return SDComponents(None, built.pop("vae"), built.pop("text_encoder"), built.pop("tokenizer"),
                        built.pop("scheduler"), transformer=built.pop("transformer"), family=family,
                        source=source or f"random:{name}", **built)


def _random_from_directory(name: str, seed: int) -> SDComponents:
    from transformers import CLIPTokenizer

    root = Path(name)
    family = model_family(name, _model_index(name, {}))
    if family in FLOW_FAMILIES:
        return random_flow_from_directory(name, seed)
    read = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
            "scheduler": "scheduler/scheduler_config.json"}
    if (root / "text_encoder_2").is_dir():
        read["text_encoder_2"] = "text_encoder_2/config.json"
    missing = [rel for rel in read.values() if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"model.random_weights: {root} lacks {missing} (a diffusers Stable Diffusion "
                                "directory has unet/, vae/, text_encoder/, scheduler/ and tokenizer/)")
    configs = {part: json.loads((root / rel).read_text()) for part, rel in read.items()}
    tokenizers = {"tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")}
    if "text_encoder_2" in configs:
        tokenizers["tokenizer_2"] = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")
    components = build_from_configs(**configs, seed=seed, source=f"random:{name}", **tokenizers)
    if components.is_sdxl:
        components.force_zeros_for_empty_prompt = _force_zeros_for_empty_prompt(_model_index(name, {}))
    return components


def _model_index(name: str, kw: dict) -> dict:
    """A diffusers directory's or hub id's model_index.json ({} for a directory without one)."""
    from diffusers import DiffusionPipeline

    if Path(name).is_dir():
        index = Path(name) / "model_index.json"
        return json.loads(index.read_text()) if index.is_file() else {}
    return dict(DiffusionPipeline.load_config(name, **kw))


def _force_zeros_for_empty_prompt(index: dict) -> bool:
    """An SDXL model's empty-negative-prompt setting from its model_index.json; the default is on."""
    return bool(index.get("force_zeros_for_empty_prompt", True))


def model_family(name: str, index: dict) -> str:
    """The family of a diffusers directory or hub id from its model_index.json (`index`): the family whose
    pipeline its `_class_name` names; otherwise (no index, another SD pipeline class) sdxl when it has a
    text_encoder_2, else sd."""
    by_class = {cls: family for family, cls in FAMILY_PIPELINES.items()}
    if index.get("_class_name") in by_class:
        return by_class[index["_class_name"]]
    if Path(name).is_dir():
        return "sdxl" if (Path(name) / "text_encoder_2").is_dir() else "sd"
    return "sdxl" if "text_encoder_2" in index else "sd"


def absent_parts(index: dict, family: str) -> dict[str, None]:
    """The parts of a flow family's model that its model_index.json names `[null, null]`: a model shipped
    without them (SD 3 without its T5: text_encoder_3 and tokenizer_3), each mapped to None. The stock
    pipeline's `from_pretrained` wants those passed as None, as diffusers' SD 3 docs load it without T5."""
    return {part: None for part in FLOW_PARTS[family]
            if isinstance(index.get(part), list) and index[part][0] is None}


def family_of(name: str) -> str:
    """The family of `model.name` without building or loading it: a preset's, an architecture's (its config
    files), or a diffusers directory's or cached hub id's (its model_index.json, `model_family`)."""
    if name in PRESETS:
        return "sdxl" if PRESETS[name].text2_hidden else "sd"
    if name in FLOW_PRESETS:
        return FLOW_PRESETS[name].family
    if name in ARCHITECTURES:
        root = ARCHITECTURES[name]
        if (root / "transformer.json").is_file():
            cls = json.loads((root / "transformer.json").read_text())["_class_name"]
            return "flux" if cls.startswith("Flux") else "sd3"
        return "sdxl" if (root / "text_encoder_2.json").is_file() else "sd"
    return model_family(name, _model_index(name, {}))


def local_family(name: str) -> str | None:
    """`family_of` where it needs no network (a preset, an architecture or a local folder); None for a hub
    id, whose family is known once it loads."""
    if name in PRESETS or name in FLOW_PRESETS or name in ARCHITECTURES or Path(name).is_dir():
        return family_of(name)
    return None


def _flow_from_pretrained(name: str, family: str, index: dict, kw: dict, variant: str | None) -> SDComponents:
    """A flow model's components through its stock pipeline's own loading (every part in fp32)."""
    # Stored weights may be half precision; training casts the frozen base to its mixed-precision dtype.
    pipe = pipeline_class(family).from_pretrained(name, variant=variant, dtype=torch.float32,
                                                  **absent_parts(index, family), **kw)
    parts = {k: getattr(pipe, k, None)
             for k in ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")}
    return SDComponents(None, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                        transformer=pipe.transformer, family=family, source=str(name), **parts)


def _from_pretrained(name: str, revision: str | None, variant: str | None) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(name).is_dir()
    # A hub id downloads once into the Hugging Face cache, as diffusers does; HF_HUB_OFFLINE=1 reads the
    # cache only.
    kw: dict[str, Any] = {} if local else {"revision": revision}
    try:
        index = _model_index(name, kw)
        family = model_family(name, index)
        if family in FLOW_FAMILIES:
            return _flow_from_pretrained(name, family, index, kw, variant)
        if local and not (Path(name) / "unet").is_dir():
            raise FileNotFoundError(f"{name} is not a diffusers Stable Diffusion directory (no unet/ "
                                    "subfolder)")
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=variant, **kw)
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", variant=variant, **kw)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=variant, **kw)
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)
        # SDXL ships an Euler scheduler config; its betas and prediction type are what DDPM reads from it.
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
        second = {}
        if family == "sdxl":
            second["family"] = "sdxl"
            second["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                name, subfolder="text_encoder_2", variant=variant, **kw).to(torch.float32)
            second["tokenizer_2"] = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw)
            second["force_zeros_for_empty_prompt"] = _force_zeros_for_empty_prompt(index)
    except OSError as err:
        if local:
            raise
        raise OSError(
            f"model {name!r} is neither a preset ({_preset_names()}), a diffusers "
            f"directory, nor a Stable Diffusion model id that could be loaded ({err}). "
            + unreachable_advice("point model.name at a local diffusers directory.")
        ) from err
    # Weights may be stored in fp16 (the shipped toy model is); diffusers upcasts its models on load,
    # transformers keeps the stored dtype. Start every module in fp32: training casts the frozen base
    # to its mixed-precision dtype itself.
    text_encoder.to(torch.float32)
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source=str(name), **second)


def load_vae(name: str, revision: str | None = None):
    """An AutoencoderKL from a VAE directory (config.json at its top), a pipeline directory (vae/), or a
    hub id of either kind (`model.vae`)."""
    from diffusers import AutoencoderKL

    root = Path(name)
    if root.is_dir():
        if (root / "config.json").is_file():
            return AutoencoderKL.from_pretrained(root)
        if (root / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(root, subfolder="vae")
        raise FileNotFoundError(f"model.vae {name} holds neither config.json nor vae/config.json (a "
                                "diffusers AutoencoderKL folder, or a pipeline folder with vae/)")
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:  # a path (a hub id is owner/name)
        raise FileNotFoundError(f"model.vae {name} does not exist (a diffusers AutoencoderKL folder, a "
                                "pipeline folder with vae/, or a hub id such as "
                                "madebyollin/sdxl-vae-fp16-fix)")
    try:
        return AutoencoderKL.from_pretrained(name, revision=revision)
    except OSError as err:
        raise OSError(f"model.vae {name!r} could not be loaded as a hub VAE "
                      f"({str(err).strip().splitlines()[0]}). "
                      + unreachable_advice("point model.vae at a local VAE folder.")) from err


def enable_attention(components: SDComponents, attention: str) -> None:
    """Select attention kernels; xformers is optional and fails at start with an install hint."""
    if attention == "sdpa":
        return  # diffusers uses torch.nn.functional.scaled_dot_product_attention by default
    if attention != "xformers":
        raise ValueError(f"model.attention must be 'sdpa' or 'xformers', got {attention!r}")
    try:
        import xformers  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "model.attention=xformers but xformers is not installed: `pip install social-refl[xformers]` "
            "(needs CUDA), or set model.attention=sdpa"
        ) from err
    try:
        components.denoiser.enable_xformers_memory_efficient_attention()
        components.vae.enable_xformers_memory_efficient_attention()
    except Exception as err:  # xformers imports on CPU but its kernels refuse to run there
        raise RuntimeError(f"xformers is installed but cannot run here ({err}); set "
                           "model.attention=sdpa") from err


def check_model_path(name: str, key: str) -> None:
    """A name that can only be a local folder (absolute, ./ or ../, ~, or more than one '/': a hub id is
    ORG/NAME) and does not exist is said so, not sent to the hub for advice about the connection."""
    path = Path(name).expanduser()
    if path.exists():
        return
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.strip("/").count("/") > 1:
        raise FileNotFoundError(f"{key} {name} does not exist (a diffusers model folder, a hub id ORG/NAME, "
                                f"or a preset: {', '.join(sorted(PRESETS))})")


def denoiser_module_names(cfg: ModelConfig) -> list[str] | None:
    """The module names of a local diffusers directory's denoiser (its `unet/` or `transformer/`), built from
    its config on the meta device: no weight is read, so settings that name modules are checked in a second,
    before minutes of loading. None for a preset, an architecture or a hub id (their names are checked once
    the model is built)."""
    root = Path(cfg.name).expanduser()
    if cfg.name in PRESETS or cfg.name in FLOW_PRESETS or cfg.name in ARCHITECTURES or not root.is_dir():
        return None
    import diffusers
    from accelerate import init_empty_weights

    index = _model_index(str(root), {})
    part = "transformer" if model_family(str(root), index) in FLOW_FAMILIES else "unet"
    class_name = (index.get(part) or [None, "UNet2DConditionModel" if part == "unet" else None])[1]
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not (root / part / "config.json").is_file():
        return None
    with init_empty_weights():
        denoiser = cls.from_config(cls.load_config(root / part))
    return [name for name, _ in denoiser.named_modules() if name]


def load_components(cfg: ModelConfig | str) -> SDComponents:
    """The one factory: a preset name, a diffusers directory, or a locally cached model id."""
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    if cfg.name in PRESETS:
        components = build_preset(cfg.name, seed=cfg.seed)
    elif cfg.name in FLOW_PRESETS:
        components = build_flow_preset(cfg.name, seed=cfg.seed)
    elif cfg.name in ARCHITECTURES:
        components = build_architecture(cfg.name, seed=cfg.seed)
    elif cfg.random_weights:
        if Path(cfg.name).is_dir():
            components = _random_from_directory(cfg.name, cfg.seed)
        elif cfg.name in HUB_ARCHITECTURES:
            components = build_architecture(HUB_ARCHITECTURES[cfg.name], seed=cfg.seed)
        else:
            raise ValueError(f"model.random_weights: no architecture known for {cfg.name!r}; use a diffusers "
                             f"directory, a preset {_preset_names()}, or one of "
                             f"{sorted(HUB_ARCHITECTURES)}")
    else:
        check_model_path(cfg.name, "model.name")
        components = _from_pretrained(cfg.name, cfg.revision, cfg.variant)
    if cfg.vae:
        components.vae = load_vae(cfg.vae, cfg.revision)
        logger.info("VAE from %s (force_upcast=%s)", cfg.vae,
                    getattr(components.vae.config, "force_upcast", None))
    enable_attention(components, cfg.attention)
    if components.family == "sd3" and components.text_encoder_3 is None and cfg.attention == "sdpa":
        collapse_zero_t5(components.transformer, components.tokenizer.model_max_length)
    logger.info("%s components from %s: %s %.2fM params, %d px images", components.family, components.source,
                components.denoiser_name, sum(p.numel() for p in components.denoiser.parameters()) / 1e6,
                components.image_size)
    return components


def build_pipeline(components: SDComponents, scheduler=None):
    """The family's stock pipeline over these modules (FAMILY_PIPELINES): `StableDiffusionPipeline` (no
    safety checker, no feature extractor), `StableDiffusionXLPipeline` (no watermark; an empty negative
    prompt as the model says, `force_zeros_for_empty_prompt`), `StableDiffusion3Pipeline`, `FluxPipeline`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler if scheduler is not None else components.scheduler
    if components.is_flow:
        # every text part by name, None where the model has none or its encoders were freed (precomputed
        # text embeddings): the pipeline then reads prompt_embeds
        names = ("text_encoder", "text_encoder_2", "tokenizer_2") + (
            ("text_encoder_3", "tokenizer_3") if components.family == "sd3" else ())
        return pipeline_class(components.family)(
            transformer=components.transformer, scheduler=scheduler, vae=components.vae,
            tokenizer=components.tokenizer, **{name: getattr(components, name) for name in names})
    if components.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=components.force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(components: SDComponents, directory: str | os.PathLike) -> Path:
    """Save as a standard diffusers directory (the family's stock pipeline class, e.g.
    `StableDiffusionPipeline.from_pretrained(dir)` or `FluxPipeline.from_pretrained(dir)`, loads it),
    atomically: a crash never leaves a half-written model."""
    with atomic_dir(directory) as tmp:
        build_pipeline(components).save_pretrained(tmp, safe_serialization=True)
    return Path(directory)
