"""SD 3 without its T5, run exactly on one of the 256 zero "T5" tokens.

diffusers' `StableDiffusion3Pipeline` runs without a T5 (`text_encoder_3=None`, as its docs load SD 3 to save
memory) by putting `max_sequence_length` (256) zero vectors where T5's states would be. Those tokens are
identical through every block: the context stream is per token and has no positions, so every copy has the
same query, key and value in every joint attention. Attention over `n` identical keys with identical values
is attention over one of them with its logit raised by log n, so the transformer's output (and its gradient
with respect to every weight, being the same function of them) is the stock one when the context carries
one zero token and the attention adds log 256 to that token's logit.

That is `ZeroT5Attention`. It is installed at load time on a T5-less SD 3 (`load_components`, SDPA
attention) and acts only on a context of the short length (the CLIP tokens + 1); any other context (the
stock 256 zero tokens, a T5's states) gets the stock `JointAttnProcessor2_0`, so a stock pipeline call over
the same modules is unchanged. This project's own calls ask for the short context (`t5_options`): the
sampler (`refl.sampling`) and the training conditioning (`refl.conditioning`). On the toy flow model
(64 image tokens, 16 CLIP tokens) that cuts the joint sequence from 336 tokens to 81; on SD 3.5 at 1024 px
(4,096 image tokens) it saves 6% of the tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The zero "T5" tokens the stock StableDiffusion3Pipeline appends without a T5 (its max_sequence_length).
PIPELINE_T5_TOKENS = 256


class ZeroT5Attention:
    """SD 3's joint attention where a context of `short_len` tokens ends in one zero token standing for
    `copies` identical ones (its logit raised by log(copies)); every other call is the stock processor's."""

    def __init__(self, short_len: int, copies: int = PIPELINE_T5_TOKENS):
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        self.short_len = short_len
        self.copies = copies
        self.stock = JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] != self.short_len:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        b, n_image, _ = hidden_states.shape

        def heads(x, norm=None):  # (B, T, H*d) -> (B, H, T, d)
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                       heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                       heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        v = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        bias = torch.zeros(1, k.shape[2], dtype=q.dtype, device=q.device)  # (1, T): every query's logit bias
        bias[:, -1] = math.log(self.copies)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, d)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)  # (B, T, H*d)
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def collapse_zero_t5(transformer, clip_tokens: int) -> None:
    """Install `ZeroT5Attention` on a T5-less SD 3 transformer whose CLIP side is `clip_tokens` long."""
    transformer.set_attn_processor(ZeroT5Attention(clip_tokens + 1))


def zero_t5_collapsed(transformer) -> bool:
    """Whether `collapse_zero_t5` is installed on this transformer (every attention of it)."""
    processors = getattr(transformer, "attn_processors", None) or {}
    return bool(processors) and all(isinstance(p, ZeroT5Attention) for p in processors.values())


def t5_options(transformer) -> dict:
    """The stock SD 3 pipeline's `__call__` / `encode_prompt` keywords for this transformer's short context:
    `max_sequence_length=1` where `ZeroT5Attention` is installed, nothing (the pipeline's 256) otherwise."""
    return {"max_sequence_length": 1} if transformer is not None and zero_t5_collapsed(transformer) else {}
