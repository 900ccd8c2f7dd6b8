"""One factory for diffusion-model components: SD 1.x / 2.x and SDXL (UNets), SD 3 / 3.5 and FLUX.1
(flow-matching transformers). `SDComponents.family` says which ("sd", "sdxl", "sd3", "flux").

`load_components(ModelConfig(name=...))` returns UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer and the training (DDPM) scheduler, and for SDXL also its second text encoder
(CLIPTextModelWithProjection, whose projected end-of-text embedding is SDXL's pooled text embedding) and
second tokenizer, from
- a diffusers directory (`model_index.json` + subfolders; SDXL when it has `text_encoder_2/`),
- a hub model id (downloaded and cached as diffusers does; `HF_HUB_OFFLINE=1` uses the cache only),
- or a named preset built with seeded random weights: `"tiny"` for tests, `"tiny-v"` (SD 2.x style:
  v-prediction, linear attention projections), `"tiny-sdxl"` (SDXL's layout: two text encoders, pooled
  embedding and size conditioning), `"toy"` for the toy world, and the full-size architectures `"sd15"`
  and `"sdxl"` from the configs shipped in `refl/model_configs/`, and the flow presets `"tiny-sd3"` and
  `"tiny-flux"` (SD3Transformer2DModel / FluxTransformer2DModel, T5 beside CLIP, the 16-channel VAE).

The parts, each importing only those above it:
- `container`: `SDComponents` (what every other module receives), `ModelConfig`, `Checkpointing`, `DTYPES`;
- `tokenizers`: CLIP tokenizers rebuilt offline from open_clip's vocabulary, a small T5 tokenizer;
- `presets`: the UNet presets and full-size architectures with seeded random weights;
- `flow_presets`: the flow-matching presets;
- `zero_t5`: SD 3 without its T5 run exactly on one of the pipeline's 256 zero tokens;
- `loading`: diffusers directories and hub ids, `load_components`, `build_pipeline`, `save_pipeline`.
Everyone else imports from `refl.components`.
"""

from refl.components.container import (
    DTYPES,
    FAMILIES,
    FLOW_FAMILIES,
    UNET_CHECKPOINTING,
    Checkpointing,
    ModelConfig,
    SDComponents,
)
from refl.components.flow_presets import FLOW_PRESETS, FlowPresetSpec, build_flow_preset
from refl.components.loading import (
    FAMILY_PIPELINES,
    build_pipeline,
    denoiser_module_names,
    enable_attention,
    family_of,
    load_components,
    load_vae,
    local_family,
    model_family,
    pipeline_class,
    random_flow_from_directory,
    save_pipeline,
)
from refl.components.presets import (
    ARCHITECTURES,
    HUB_ARCHITECTURES,
    MODEL_CONFIG_DIR,
    PRESETS,
    PresetSpec,
    build_architecture,
    build_from_configs,
    build_preset,
)
from refl.components.tokenizers import (
    CLIP_VOCAB_SIZE,
    SDXL_PAD_TOKEN_2,
    build_clip_tokenizer,
    build_t5_tokenizer,
    clip_vocab_files,
)
from refl.components.zero_t5 import PIPELINE_T5_TOKENS, ZeroT5Attention, collapse_zero_t5, t5_options

__all__ = [
    "ARCHITECTURES",
    "CLIP_VOCAB_SIZE",
    "DTYPES",
    "FAMILIES",
    "FAMILY_PIPELINES",
    "FLOW_FAMILIES",
    "FLOW_PRESETS",
    "HUB_ARCHITECTURES",
    "MODEL_CONFIG_DIR",
    "PIPELINE_T5_TOKENS",
    "PRESETS",
    "SDXL_PAD_TOKEN_2",
    "UNET_CHECKPOINTING",
    "Checkpointing",
    "FlowPresetSpec",
    "ModelConfig",
    "PresetSpec",
    "SDComponents",
    "ZeroT5Attention",
    "build_architecture",
    "build_clip_tokenizer",
    "build_flow_preset",
    "build_from_configs",
    "build_pipeline",
    "collapse_zero_t5",
    "build_preset",
    "clip_vocab_files",
    "denoiser_module_names",
    "enable_attention",
    "family_of",
    "load_components",
    "load_vae",
    "local_family",
    "model_family",
    "pipeline_class",
    "random_flow_from_directory",
    "save_pipeline",
    "build_t5_tokenizer",
    "t5_options",
]
