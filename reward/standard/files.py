"""Where a standard reward model's weights come from: a local file or folder, or a hub repository through
the Hugging Face cache; each read names the path and the expected layout (`LAYOUTS`) when it fails."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reward.standard.base import WeightsError

# What each kind's loader reads, quoted in every error about its files.
LAYOUTS = {
    "clipscore": "an open_clip NAME[:PRETRAINED] (pretrained: an open_clip tag whose weights are cached, "
                 "or a checkpoint file path; OpenAI weights from a file need the -quickgelu name), e.g. "
                 "ViT-L-14-quickgelu:openai",
    "aesthetic": "sac+logos+ava1-l14-linearMSE.pth (or a folder holding it; published with LAION's "
                 "improved-aesthetic-predictor): a torch state dict with keys "
                 "layers.{0,2,4,6,7}.{weight,bias} for Linear 768-1024-128-64-16-1; the image embedding "
                 "comes from open_clip ViT-L-14-quickgelu:openai (option backbone=NAME:PRETRAINED)",
    "pickscore": "a transformers CLIPModel folder (config.json + model.safetensors or pytorch_model.bin), "
                 "e.g. a snapshot of yuvalkirstain/PickScore_v1",
    "hpsv2": "HPS_v2_compressed.pt (or a folder holding it): a torch file holding {'state_dict': open_clip "
             "ViT-H-14 state dict}, from the hub repository xswu/HPSv2",
    "hpsv21": "HPS_v2.1_compressed.pt (or a folder holding it): a torch file holding {'state_dict': "
              "open_clip ViT-H-14 state dict}, from the hub repository xswu/HPSv2",
    "imagereward": "a folder with ImageReward.pt (torch state dict: blip.visual_encoder.*, "
                   "blip.text_encoder.*, mlp.layers.*) and med_config.json (the BERT config), from the hub "
                   "repository THUDM/ImageReward; plus the bert-base-uncased tokenizer (vocab.txt in the "
                   "folder, or option tokenizer=PATH_OR_HUB_ID)",
}


def hub_like(argument: str) -> bool:
    """'owner/name' with no file suffix and nothing on disk: a hub repository id."""
    parts = argument.split("/")
    weights_suffix = Path(argument).suffix.lower() in {".pt", ".pth", ".bin", ".safetensors", ".ckpt",
                                                       ".json"}
    return len(parts) == 2 and all(parts) and not argument.startswith((".", "~")) and not weights_suffix


def hub_download(repo: str, filename: str, kind: str, layout: str) -> Path:
    """One file of a hub repository through huggingface_hub's cache (HF_HUB_OFFLINE: cache only)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as err:  # offline, missing from the cache, no network, unknown repo: all the same advice
        raise WeightsError(f"{kind}: could not get {filename} from the hub repository {repo} "
                           f"({type(err).__name__}: {err}). Offline, download it elsewhere and pass its "
                           f"local path. Expected: {layout}") from err


def find_file(argument: str, filename: str, kind: str, layout: str, hub_repo: str) -> Path:
    """A weights file: the argument itself, `filename` inside the argument's folder, or from the hub."""
    path = Path(argument).expanduser() if argument else None
    if path is not None and path.is_file():
        return path
    if path is not None and path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise WeightsError(f"{kind}: {path} has no {filename}. Expected: {layout}")
    if not argument and not hub_repo:  # published outside the hub: nothing to fetch by default
        raise WeightsError(f"{kind}: name its weights file, as {kind}:PATH (no hub repository hosts it). "
                           f"Expected: {layout}")
    if not argument or hub_like(argument):
        return hub_download(argument or hub_repo, filename, kind, layout)
    raise WeightsError(f"{kind}: {path} does not exist. Expected: {layout}")


def torch_load(path: Path, kind: str, layout: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{kind}: {path} cannot be read as a torch checkpoint ({err}). Expected: "
                           f"{layout}") from err


def load_exact(module: nn.Module, state: dict, path: Path, kind: str, layout: str,
               ignore: tuple[str, ...] = ()):
    """load_state_dict that names the file, the missing and the unexpected keys (ignoring `ignore`
    prefixes)."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{kind}: {path} does not hold a state dict of tensors. Expected: {layout}")
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{kind}: {path} does not match the model: {len(missing)} missing key(s) "
                           f"{missing[:4]}, {len(unexpected)} unexpected key(s) {unexpected[:4]}. Expected: "
                           f"{layout}")

