"""The flow-model recipes (configs/refl_sd35m.yaml, configs/refl_flux.yaml) load and resolve without a
download: their model is a shipped architecture, built here on the meta device; the sampler, guidance,
checkpointing and text embeddings fit its family; and the GPU size each header names holds the peak the
memory model's JSON gives for that recipe's method, batch and trajectory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from refl.components import HUB_ARCHITECTURES, build_architecture
from refl.config import ReflConfig
from refl.sampling import schedulers_for
from refl.step import checkpointing_for, validate_step_config
from refl.text_embeddings import precompute_wanted
from runkit.config import load_config

REPO = Path(__file__).resolve().parents[1]
# recipe -> (its architecture, its memory model)
RECIPES = {"refl_sd35m.yaml": ("sd35m", "refl_sd35m_memory_model.json"),
           "refl_flux.yaml": ("flux-dev", "refl_flux_memory_model.json")}
# GiB a card must keep beyond the modelled tensors: CUDA context, allocator cache and fragmentation. A "24 GB"
# card holds about 24 GiB (an RTX 4090: 23.99).
SPARE_GIB = 2.0


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_flow_recipe_loads_resolves_and_fits_the_gpu_it_names(recipe):
    arch, model_file = RECIPES[recipe]
    path = REPO / "configs" / recipe
    cfg = load_config(ReflConfig, path)
    assert HUB_ARCHITECTURES[cfg.model.name] == arch
    components = build_architecture(arch, device="meta")  # shapes only: nothing downloaded or allocated
    assert components.is_flow and components.image_size == 1024
    validate_step_config(cfg.step)
    assert cfg.step.scheduler in schedulers_for(components)
    assert cfg.train.mixed_precision == "bf16" and cfg.train.gradient_checkpointing
    assert checkpointing_for(cfg.step.method, True, components.family).unet == "blocks"
    assert cfg.train.precompute_text_embeddings is None and precompute_wanted(components, None)
    assert cfg.train.validation_guidance_scale == cfg.step.guidance_scale
    if components.guidance_embedded:  # FLUX.1 [dev]: one pass, the scale its embedding
        assert components.family == "flux"

    # The memory model was made for this recipe's trajectory, and its peak fits the GPU the header names.
    model = json.loads((REPO / "benchmarks" / model_file).read_text())
    made = model["config"]
    assert made["model"] == arch and made["target_px"] == components.image_size
    assert made["mixed_precision"] == cfg.train.mixed_precision
    for key in ("scheduler", "num_inference_steps", "cut_range", "guidance_scale"):
        assert made["step"][key] == getattr(cfg.step, key), key
    entry = model["methods"][cfg.step.method]
    row = entry["settings"][entry["default"]]
    assert row["checkpointing"]["unet"] == "blocks"
    header = path.read_text().split("\nmodel:")[0]
    gpu_gb = int(re.search(r"ONE\s+#?\s*GPU of (\d+) GB", header).group(1))
    peak = row["peak_gib"][str(cfg.train.batch_size)]
    assert peak + SPARE_GIB < gpu_gb, f"{recipe}: {peak:.1f} GiB does not fit {gpu_gb} GB"
    assert f"{peak:.1f} GiB" in " ".join(header.split())  # the header quotes the model's figure
