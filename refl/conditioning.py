"""What the denoiser reads beside the latents and the timestep, on the gradient path of refl.step.

SD 1.x / 2.x: the text encoder's last hidden states. SDXL, as its stock pipeline computes them (a test
compares with `StableDiffusionXLPipeline.encode_prompt`):
- the penultimate hidden states of both text encoders side by side, (B, 77, 768 + 1280) at full size;
- the pooled text embedding: text_encoder_2's projected end-of-text state, (B, 1280);
- `add_time_ids`, the six size numbers SDXL was trained with: original (height, width), crop top-left
  (0, 0) and target (height, width), here all the model's own image size;
- the negative of classifier-free guidance: what the stock pipeline uses for an empty negative prompt,
  zeros for both embeddings when the model's `force_zeros_for_empty_prompt` is on (SDXL base's setting),
  else "" encoded, as always for SD 1.x / 2.x.
SD 3 and FLUX: what their stock pipeline's own `encode_prompt` returns, called here with gradient (SD 3:
both CLIPs' penultimate states side by side, padded to T5's width, then T5's states; the pooled pair of
projections; a T5-less SD 3's one zero T5 token, refl.components.zero_t5; FLUX: T5's states, CLIP-L's pooled
embedding and the text position ids). SD 3's guidance negative is "" encoded; FLUX, guidance-distilled, takes
no negative.
The no-grad paths never use this module: they call the stock pipeline (refl.sampling).

Precomputed (`PromptEmbeddings`, refl.text_embeddings): when `SDComponents.text_embeddings` holds a fixed
prompt set's conditioning, computed once by `encode` itself, `encode` looks prompts up there instead of
running the text encoders (which are then freed); a prompt outside the set is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refl.components import SDComponents, build_pipeline, t5_options


@dataclass
class Conditioning:
    """The denoiser's conditioning for a batch of B prompts."""

    hidden: torch.Tensor  # (B, L, D) text hidden states the denoiser attends to
    pooled: torch.Tensor | None = None  # (B, P) pooled text embedding (SDXL, SD 3, FLUX); None for SD 1.x/2.x
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL: original size, crop top-left, target size
    text_ids: torch.Tensor | None = None  # (L, 3) FLUX: the text tokens' position ids (zeros)

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
    if first.time_ids is None:  # SD 3
        return Conditioning(torch.cat([first.hidden, second.hidden]),
                            torch.cat([first.pooled, second.pooled]))
    return Conditioning(torch.cat([first.hidden, second.hidden]), torch.cat([first.pooled, second.pooled]),
                        torch.cat([first.time_ids, second.time_ids]))


@dataclass
class PromptEmbeddings:
    """A fixed prompt set's conditioning, computed once by `encode` (refl.text_embeddings), kept on the CPU in
    the dtype it was computed in; rows are moved to the denoiser's device as they are looked up."""

    prompts: list[str]  # row i of the tensors below is prompts[i]; each prompt once
    hidden: torch.Tensor  # (N, L, D)
    pooled: torch.Tensor | None = None  # (N, P); None for SD 1.x / 2.x
    text_ids: torch.Tensor | None = None  # (L, 3) FLUX: the text tokens' position ids, the same for every row

    def __post_init__(self):
        self._rows = {p: i for i, p in enumerate(self.prompts)}
        if len(self._rows) != len(self.prompts) or self.hidden.shape[0] != len(self.prompts):
            raise ValueError("PromptEmbeddings needs each prompt once and one row of hidden per prompt")

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._rows

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        """The row index of each prompt, (B,); a prompt outside the set is refused by name."""
        missing = [p for p in prompts if p not in self._rows]
        if missing:
            raise KeyError(f"prompt {missing[0]!r} is not among the {len(self.prompts)} prompts whose text "
                           "embeddings were computed at start (train.precompute_text_embeddings fixes the "
                           "prompt set: training, validation and regulariser prompts); add it to those, or "
                           "set train.precompute_text_embeddings=false")
        return torch.tensor([self._rows[p] for p in prompts], dtype=torch.long)

    def lookup(self, components: SDComponents, prompts: Sequence[str]) -> Conditioning:
        """The conditioning `encode` gave these prompts, on the denoiser's device."""
        idx = self.rows(prompts)
        device = components.denoiser.device
        hidden = self.hidden[idx].to(device)  # (B, L, D)
        pooled = self.pooled[idx].to(device) if self.pooled is not None else None  # (B, P)
        if components.is_sdxl:
            return Conditioning(hidden, pooled, size_ids(components, len(prompts), device))
        text_ids = self.text_ids.to(device) if self.text_ids is not None else None  # (L, 3)
        return Conditioning(hidden, pooled, text_ids=text_ids)


def _token_ids(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)  # (B, L)


def size_ids(components: SDComponents, batch: int, device) -> torch.Tensor:
    """SDXL's add_time_ids at the model's own image size, no crop: (B, 6)."""
    size = components.image_size
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device).repeat(batch, 1)


def encode(components: SDComponents, prompts: Sequence[str]) -> Conditioning:
    """Prompts -> the denoiser's conditioning; differentiable through text encoders that carry trainable
    LoRA. With precomputed embeddings (`components.text_embeddings`) a lookup."""
    if components.text_embeddings is not None:
        return components.text_embeddings.lookup(components, prompts)
    if components.is_flow:
        return _encode_flow(components, prompts)
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


def _encode_flow(components: SDComponents, prompts: Sequence[str]) -> Conditioning:
    """SD 3's or FLUX's conditioning from its stock pipeline's `encode_prompt` (with gradient here)."""
    pipe = build_pipeline(components)
    device = components.text_encoder.device
    if components.family == "flux":
        hidden, pooled, text_ids = pipe.encode_prompt(list(prompts), None, device=device)
        return Conditioning(hidden, pooled, text_ids=text_ids)  # (B, L, D), (B, P), (L, 3)
    hidden, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device,
                                              do_classifier_free_guidance=False,
                                              **t5_options(components.transformer))
    return Conditioning(hidden, pooled)  # (B, L_clip + L_t5, D), (B, P); L_t5 1 for a T5-less SD 3


def negative(components: SDComponents, cond: Conditioning) -> Conditioning:
    """The guidance negative for a batch like `cond`: the empty prompt, as the stock pipeline draws it."""
    if components.guidance_embedded:
        raise ValueError(f"a {components.family} model takes its guidance as an embedding: it has no "
                         "negative")
    if not (components.is_sdxl and components.force_zeros_for_empty_prompt):
        return encode(components, [""] * len(cond))
    return Conditioning(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled), cond.time_ids)
