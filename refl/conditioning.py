"""What the UNet reads beside the latents and the timestep, on the gradient path of refl.step.

SD 1.x / 2.x: the text encoder's last hidden states. SDXL, as its stock pipeline computes them (a test
compares with `StableDiffusionXLPipeline.encode_prompt`):
- the penultimate hidden states of both text encoders side by side, (B, 77, 768 + 1280) at full size;
- the pooled text embedding: text_encoder_2's projected end-of-text state, (B, 1280);
- `add_time_ids`, the six size numbers SDXL was trained with: original (height, width), crop top-left
  (0, 0) and target (height, width), here all the model's own image size;
- the negative of classifier-free guidance: what the stock pipeline uses for an empty negative prompt,
  zeros for both embeddings when the model's `force_zeros_for_empty_prompt` is on (SDXL base's setting),
  else "" encoded, as always for SD 1.x / 2.x.
The no-grad paths never use this module: they call the stock pipeline (refl.sampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refl.components import SDComponents


@dataclass
class Conditioning:
    """The UNet's conditioning for a batch of B prompts."""

    hidden: torch.Tensor  # (B, L, D) text hidden states the UNet cross-attends to
    pooled: torch.Tensor | None = None  # (B, P) SDXL: pooled text embedding; None for SD 1.x / 2.x
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop top-left, target size

    def unet_kwargs(self) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` besides sample and timestep."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.hidden}
        return {"encoder_hidden_states": self.hidden,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": self.time_ids}}

    def __len__(self) -> int:
        return self.hidden.shape[0]


def cat(first: Conditioning, second: Conditioning) -> Conditioning:
    """Two batches as one, `first` first (classifier-free guidance: the negative half first)."""
    if first.pooled is None:
        return Conditioning(torch.cat([first.hidden, second.hidden]))
    return Conditioning(torch.cat([first.hidden, second.hidden]), torch.cat([first.pooled, second.pooled]),
                        torch.cat([first.time_ids, second.time_ids]))


def _token_ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)  # (B, L)


def size_ids(components: SDComponents, batch: int, device) -> torch.Tensor:
    """SDXL's add_time_ids at the model's own image size, no crop: (B, 6)."""
    size = components.image_size
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device).repeat(batch, 1)


def encode(components: SDComponents, prompts: Sequence[str]) -> Conditioning:
    """Prompts -> the UNet's conditioning; differentiable through text encoders that carry trainable LoRA."""
    if not components.is_sdxl:
        ids = _token_ids(components.tokenizer, prompts, components.text_encoder.device)
        return Conditioning(components.text_encoder(ids)[0])  # (B, L, D)
    hidden = []
    for tokenizer, encoder in ((components.tokenizer, components.text_encoder),
                               (components.tokenizer_2, components.text_encoder_2)):
        out = encoder(_token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, L, D_i), the penultimate layer as SDXL was trained
    pooled = out.text_embeds  # (B, P) of text_encoder_2, the last one
    return Conditioning(torch.cat(hidden, dim=-1), pooled, size_ids(components, len(prompts), pooled.device))


def negative(components: SDComponents, cond: Conditioning) -> Conditioning:
    """The guidance negative for a batch like `cond`: the empty prompt, as the stock pipeline draws it."""
    if not (components.is_sdxl and components.force_zeros_for_empty_prompt):
        return encode(components, [""] * len(cond))
    return Conditioning(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled), cond.time_ids)
