"""A saved LoRA in the layouts other tools read: `export_lora(folder)` writes the layout they load for that
LoRA's model, `export_lora(folder, "kohya" | "diffusers")` a named one.

The kohya layout (`lora_unet_*`, and `lora_te_*` for SD 1.x's text encoder or `lora_te1_*` / `lora_te2_*`
for SDXL's two, keys with `lora_down` / `lora_up` / `alpha`) is what AUTOMATIC1111, ComfyUI and Forge load.
The UNet keys keep diffusers' block names (`lora_unet_down_blocks_1_attentions_0_...`), for SDXL too: each of
those tools maps them onto the original UNet's `input_blocks` / `middle_block` / `output_blocks` itself, as
sd-scripts does when it reads them (docs/refl.md names where; tests/test_sdxl.py checks every key of full-size
SD 1.5 and SDXL against those rules). The keys come from diffusers' own converters (diffusers format -> peft
-> kohya); three facts those converters leave to the caller are set here:
- diffusers' kohya converter writes alpha = rank for every module. A LoRA trained with alpha != rank
  would then load at the wrong scale, so the alpha saved with the weights (their adapter metadata) is
  written instead.
- transformers 5's CLIPTextModel has no `text_model.` level, so its peft keys lack the prefix that
  CLIP text-encoder checkpoints, kohya files and the tools reading them use; it is put back (diffusers'
  loader removes it again for an encoder without that level). SDXL's second encoder has it already.
- diffusers names the one text encoder of SD 1.x `lora_te1_`, SDXL's first encoder's name; sd-scripts and the
  tools' SD 1.x convention is `lora_te_` (sd-scripts matches no `lora_te1_` module in an SD 1.x model), so an
  SD 1.x export is written with it.

Transformer LoRAs (SD 3, FLUX) go out in the diffusers layout itself. ComfyUI's LoRA key map (comfy/lora.py,
`model_lora_keys_unet`) registers `transformer.<diffusers module name>` for SD 3 (through its table
`comfy.utils.mmdit_to_diffusers`) and for FLUX (`comfy.utils.flux_to_diffusers`, which also splits its
fused qkv / linear1 weights by slices), and its `load_lora` reads peft's `lora_A` / `lora_B` names; Forge's
copy of that code maps FLUX the same way (its SD 3 branch is commented out: Forge does not run SD 3).
diffusers has no converter to another layout for these families, and none is needed. One fact is set
here: those loaders take alpha from a `<key>.alpha` tensor, else apply the update at alpha = rank, and
never read the adapter metadata that carries alpha in the folder's file (and diffusers' FLUX loader
refuses alpha tensors together with that metadata). The export therefore folds alpha / rank into lora_B
and writes neither: every loader then applies the trained update, alpha / rank x B A.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from refl.lora import check_lora_dir
from runkit.files import atomic_write_bytes

logger = logging.getLogger(__name__)

# Module prefixes of a diffusers LoRA file -> the kohya prefix their keys get (diffusers' converter's), and
# the one text encoder of an SD 1.x LoRA (no text_encoder_2), named as sd-scripts names it.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
SD1_TEXT_PREFIX = "lora_te_"


def read_lora(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The tensors of a saved LoRA folder (refl.lora.save_lora) and its adapter settings per module
    ({"unet": {"r": 4, "lora_alpha": 16, ...}, ...}; empty for a file saved without metadata)."""
    from safetensors import safe_open

    weights = check_lora_dir(directory)
    with safe_open(str(weights), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    settings: dict[str, dict] = {}
    for key, value in raw.items():  # "unet.lora_alpha" -> settings["unet"]["lora_alpha"]
        module, _, field = key.partition(".")
        settings.setdefault(module, {})[field] = value
    return tensors, settings


def _with_text_model(peft: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """A text encoder's peft keys with the `text_model.` level CLIP checkpoints have (module docstring)."""
    if not module.startswith("text_encoder"):
        return peft
    head = f"{module}.text_model."
    return {k if k.startswith(head) else head + k[len(module) + 1:]: v for k, v in peft.items()}


def kohya_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The LoRA of `directory` in the kohya layout, and safetensors metadata naming its rank and alpha."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    tensors, settings = read_lora(directory)
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    unknown = [m for m in modules if m not in KOHYA_PREFIXES]
    if unknown:
        hint = (" (a transformer LoRA of SD 3 / FLUX: ComfyUI and Forge load it in layout=diffusers)"
                if "transformer" in unknown else "")
        raise ValueError(f"{directory}: LoRA tensors of {unknown}; the kohya export knows "
                         f"{sorted(KOHYA_PREFIXES)}{hint}")
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for module in modules:
        part = {k: v for k, v in tensors.items() if k.startswith(module + ".")}
        peft = convert_all_state_dict_to_peft(part)  # keys stay prefixed by the module name
        kohya = convert_state_dict_to_kohya(_with_text_model(peft, module))
        if not all(k.startswith(KOHYA_PREFIXES[module]) for k in kohya):
            raise ValueError(f"{directory}: diffusers' kohya converter gave keys outside "
                             f"{KOHYA_PREFIXES[module]}")
        if module == "text_encoder" and "text_encoder_2" not in modules:  # SD 1.x
            kohya = {SD1_TEXT_PREFIX + k[len(KOHYA_PREFIXES[module]):]: v for k, v in kohya.items()}
        rank = next(int(v.shape[0]) for k, v in kohya.items() if k.endswith("lora_down.weight"))
        alpha = settings.get(module, {}).get("lora_alpha")
        if alpha is None:
            logger.warning("%s: no lora_alpha saved for %s; exporting alpha = rank = %d (what diffusers "
                           "assumes)",
                           directory, module, rank)
            alpha = rank
        if settings.get(module, {}).get("alpha_pattern") or settings.get(module, {}).get("rank_pattern"):
            raise ValueError(f"{directory}: {module} has per-module rank or alpha patterns; the export "
                             "writes one alpha per module kind")
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = torch.tensor(float(alpha))
        out.update({k: v.contiguous() for k, v in kohya.items()})
        ranks[module], alphas[module] = rank, float(alpha)
    unet = "unet" if "unet" in ranks else modules[0]
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[unet]),
                "ss_network_alpha": f"{alphas[unet]:g}",
                "social_refl_ranks": json.dumps(ranks), "social_refl_alphas": json.dumps(alphas)}
    return out, metadata


def check_export_path(out: Path, overwrite: bool) -> None:
    """A file the user named: a .safetensors (what the other tools list as LoRAs), not a folder, and an
    existing one replaced only with `overwrite`."""
    if out.suffix != ".safetensors":
        raise ValueError(f"output_file {out}: name a .safetensors file (what AUTOMATIC1111, ComfyUI and "
                         "Forge load)")
    if out.is_dir():
        raise IsADirectoryError(f"output_file {out} is a folder; name the .safetensors file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output_file {out} exists; pass --overwrite to replace it, or name another "
                              "file")


def export_kohya(directory: str | os.PathLike, out: str | os.PathLike | None = None,
                 overwrite: bool = False) -> Path:
    """Write the kohya file of a LoRA folder, atomically: to `out`, or to <folder>/lora_kohya.safetensors,
    which every export of the folder rewrites (it is derived from the folder's weights)."""
    return _write_export(kohya_state_dict, directory, out, overwrite, "lora_kohya.safetensors", "kohya")


def _write_export(state_of, directory, out, overwrite: bool, default_name: str, layout: str) -> Path:
    """`state_of(directory)`'s tensors and metadata as one safetensors file, atomically: to `out` (checked
    first), or to <directory>/`default_name`."""
    from safetensors.torch import save

    if out is not None:
        check_export_path(Path(out), overwrite)
    state, metadata = state_of(directory)
    out = Path(out) if out is not None else Path(directory) / default_name
    data = save(state, metadata=metadata)
    atomic_write_bytes(out, lambda f: f.write(data))
    logger.info("wrote %d %s-layout tensors to %s", len(state), layout, out)
    return out


def diffusers_state_dict(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The transformer LoRA of `directory` (and its text encoders') in the diffusers layout with each module's
    alpha / rank folded into lora_B (see the module docstring), and safetensors metadata naming the ranks and
    trained alphas. Text-encoder keys get peft's lora_A / lora_B names and CLIP's `text_model.` level, as
    ComfyUI maps them (`text_encoder.text_model.encoder.layers.*`)."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    tensors, settings = read_lora(directory)
    modules = sorted({k.split(".", 1)[0] for k in tensors})
    if "transformer" not in modules or not set(modules) <= {"transformer", "text_encoder", "text_encoder_2"}:
        raise ValueError(f"{directory}: LoRA tensors of {modules}; the diffusers-layout export is for "
                         "transformer (SD 3 / FLUX) LoRAs, which ComfyUI and Forge load in that layout; for "
                         "a UNet LoRA: layout=kohya")
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for module in modules:
        part = {k: v for k, v in tensors.items() if k.startswith(module + ".")}
        if module != "transformer":  # saved in diffusers' text-encoder naming
            part = _with_text_model(convert_all_state_dict_to_peft(part), module)
        setting = settings.get(module, {})
        if setting.get("alpha_pattern") or setting.get("rank_pattern"):
            raise ValueError(f"{directory}: {module} has per-module rank or alpha patterns; the export folds "
                             "one alpha / rank into each of its modules")
        found = {int(v.shape[0]) for k, v in part.items() if ".lora_A." in k}
        if len(found) != 1:
            raise ValueError(f"{directory}: {module}'s LoRA ranks {sorted(found)} differ between modules; "
                             "the export folds one alpha / rank into each of its modules")
        (rank,) = found
        alpha = setting.get("lora_alpha")
        if alpha is None:
            logger.warning("%s: no lora_alpha saved for %s; exporting alpha = rank = %d (what diffusers "
                           "assumes)", directory, module, rank)
            alpha = rank
        scale = float(alpha) / rank
        out.update({k: (v.float() * scale if ".lora_B." in k else v).contiguous() for k, v in part.items()})
        ranks[module], alphas[module] = rank, float(alpha)
    metadata = {"social_refl_ranks": json.dumps(ranks), "social_refl_alphas": json.dumps(alphas),
                "social_refl_alpha_folded_into_lora_B": "true"}
    return out, metadata


def export_diffusers(directory: str | os.PathLike, out: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path:
    """Write the diffusers-layout file of a transformer LoRA folder (ComfyUI: SD 3 and FLUX; Forge: FLUX),
    atomically: to `out`, or to <folder>/lora_diffusers.safetensors, rewritten by every export (alpha / rank
    folded into lora_B)."""
    return _write_export(diffusers_state_dict, directory, out, overwrite, "lora_diffusers.safetensors",
                         "diffusers")


# Key layouts of an exported LoRA file: layout -> writer(folder, out, overwrite).
EXPORT_LAYOUTS: dict[str, Callable[..., Path]] = {"kohya": export_kohya, "diffusers": export_diffusers}


def layout_for(directory: str | os.PathLike) -> str:
    """The layout AUTOMATIC1111, ComfyUI and Forge load for the LoRA of `directory`: diffusers for a
    transformer (SD 3 / FLUX) LoRA, kohya for a UNet LoRA."""
    from safetensors import safe_open

    with safe_open(str(check_lora_dir(directory)), "pt") as f:
        transformer = any(k.startswith("transformer.") for k in f.keys())
    return "diffusers" if transformer else "kohya"


def export_lora(directory: str | os.PathLike, layout: str = "",
                out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the LoRA of `directory` in `layout` ("" = the one the tools load for it, `layout_for`)."""
    if layout and layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout={layout!r}: unknown export layout; choose one of {sorted(EXPORT_LAYOUTS)} "
                         "(or leave it empty: the one the tools load for this LoRA)")
    return EXPORT_LAYOUTS[layout or layout_for(directory)](directory, out, overwrite)


def push_to_hub(directory: str | os.PathLike, repo_id: str, private: bool = False) -> str:
    """Upload a LoRA folder (weights, model card, exported files) to a Hugging Face model repo, created if
    missing; needs network and a token (`hf auth login`). Returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                      commit_message="social-refl LoRA")
    return str(url)
