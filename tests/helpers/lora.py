"""LoRA helpers shared by the ReFL tests."""

import torch

from refl.components import load_components
from refl.lora import LoraConfig, add_lora


def tiny_lora(rank=4, alpha=4.0, **kw):
    """The tiny preset with LoRA adapters; returns (components, trainable params)."""
    components = load_components("tiny")
    params = add_lora(components, LoraConfig(rank=rank, alpha=alpha, **kw))
    return components, params


def randomise_lora_b(components, seed=1):
    """gaussian init starts B at 0 (an identity LoRA); give it values so round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in components.modules().values():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
