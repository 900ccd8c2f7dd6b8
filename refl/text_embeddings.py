"""Text embeddings computed once (`train.precompute_text_embeddings`): a run's prompts are a fixed set
(training, validation and regulariser prompts, and "" for a guidance negative), so their conditioning is
computed at start by `refl.conditioning.encode` itself, under the run's autocast, and the text encoders are
freed for the rest of the run. It matters for the flow families: SD 3's and FLUX.1's T5-XXL encoder alone has
4.7B parameters (9.5 GB in bf16), more than SD 3.5 medium's transformer.

What it costs: the prompt set is fixed at start (a prompt outside it is refused by name), and the
embeddings stay in CPU memory (bf16: FLUX 4 MiB a prompt, 512 x 4096 T5 states; SD 3 2.7 MiB, 333 x 4096).

An on-disk cache (`train.text_embeddings_cache`) keeps them across runs and resumes: one safetensors file
per prompt set and model, named by a hash of their content (the prompts' text, and the text encoders'
output on a probe prompt with the family and dtype: two copies of a model share a file, and a retrained
or re-cast encoder never reads another's), written atomically.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from refl.components import SDComponents
from refl.conditioning import Conditioning, PromptEmbeddings, encode, negative
from runkit.files import atomic_write_bytes

logger = logging.getLogger(__name__)

# The text whose embedding identifies the text encoders in the on-disk cache's key.
PROBE_PROMPT = "a photograph of an astronaut riding a horse on the moon"
# Prompts per text-encoder call while computing.
ENCODE_BATCH = 8


# The share of the machine's memory that precomputed embeddings may take when the setting is null and the
# caller names its prompt set (`precompute_wanted`): above it the text encoders stay and encode as they go.
MAX_MEMORY_SHARE = 0.25


def precompute_wanted(components: SDComponents, setting: bool | None,
                      prompts: list[str] | None = None) -> bool:
    """`train.precompute_text_embeddings`; null: on for the flow families (their T5-XXL), off for UNets and
    whenever a text encoder carries LoRA adapters (lora.train_text_encoder: its embeddings change as it
    trains). Given the run's `prompts` (a prompt set read from data, possibly large: preference tuning's
    feedback), null is also off when their embeddings would take more than MAX_MEMORY_SHARE of this
    machine's memory (measured on one prompt; logged)."""
    if setting is not None:
        return setting
    if not components.is_flow or _adapted_encoders(components):
        return False
    if not prompts:
        return True
    one = compute_embeddings(components, prompts[:1])
    per_prompt = sum(t.numel() * t.element_size() for t in (one.hidden, one.pooled) if t is not None)
    need, have = per_prompt * (len(prompts) + 1), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > MAX_MEMORY_SHARE * have:
        logger.warning("text embeddings not precomputed: those of the %d prompts would take %.1f GiB of "
                       "this machine's %.1f GiB; the text encoders stay and encode each micro-batch (set "
                       "train.precompute_text_embeddings=true to force it)", len(prompts), need / 2**30,
                       have / 2**30)
        return False
    return True


def _adapted_encoders(components: SDComponents) -> list[str]:
    return [name for name, m in components.text_encoders().items() if getattr(m, "peft_config", None)]


def prompt_set(*groups: Iterable[str]) -> list[str]:
    """The distinct prompts of all groups, sorted (so the set, not its order, names it)."""
    return sorted({p for group in groups for p in group})


@torch.no_grad()
def compute_embeddings(components: SDComponents, prompts: list[str]) -> PromptEmbeddings:
    """Each prompt's conditioning as `encode` gives it (under the base's autocast, as the step runs it),
    batch by batch, kept on the CPU."""
    parts: list[Conditioning] = []
    with components.autocast():
        for start in range(0, len(prompts), ENCODE_BATCH):
            parts.append(encode(components, prompts[start : start + ENCODE_BATCH]))
    def kept(t):  # on the CPU; a meta run's (benchmarks' memory model) have no values to move
        return t if t.is_meta else t.cpu()

    pooled = None if parts[0].pooled is None else torch.cat([kept(c.pooled) for c in parts])  # (N, P)
    text_ids = None if parts[0].text_ids is None else kept(parts[0].text_ids)  # (L, 3)
    return PromptEmbeddings(list(prompts), torch.cat([kept(c.hidden) for c in parts]), pooled,  # (N, L, D)
                            text_ids)


def cache_key(components: SDComponents, prompts: list[str]) -> str:
    """The content key of `prompts`' embeddings by these text encoders (see the module docstring)."""
    probe = compute_embeddings(components, [PROBE_PROMPT])
    h = hashlib.sha256()
    h.update(f"{components.family}\0{components.dtype}\0".encode())
    for t in (probe.hidden, probe.pooled):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.float().numpy().tobytes())
    h.update(json.dumps(prompts).encode())
    return h.hexdigest()[:40]


def _load(path: Path, prompts: list[str]) -> PromptEmbeddings | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if json.loads(f.metadata().get("prompts", "null")) != prompts:
                return None  # another prompt set under the same key: never read
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, SafetensorError) as err:  # truncated or foreign: compute again
        logger.warning("text embeddings cache %s is unreadable (%s); computing the embeddings again", path,
                       err)
        return None
    return PromptEmbeddings(prompts, tensors["hidden"], tensors.get("pooled"), tensors.get("text_ids"))


def _save(path: Path, embeddings: PromptEmbeddings) -> None:
    from safetensors.torch import save

    tensors = {"hidden": embeddings.hidden.contiguous()}
    if embeddings.pooled is not None:
        tensors["pooled"] = embeddings.pooled.contiguous()
    if embeddings.text_ids is not None:
        tensors["text_ids"] = embeddings.text_ids.contiguous()
    data = save(tensors, metadata={"prompts": json.dumps(embeddings.prompts)})
    atomic_write_bytes(path, lambda f: f.write(data))


def load_or_compute(components: SDComponents, prompts: list[str], cache_dir: str = "") -> PromptEmbeddings:
    """`prompts`' embeddings: from the on-disk cache in `cache_dir` when it holds them, else computed (and
    written there when `cache_dir` is set)."""
    if not cache_dir:
        return compute_embeddings(components, prompts)
    path = Path(cache_dir) / f"{components.family}-{cache_key(components, prompts)}.safetensors"
    cached = _load(path, prompts) if path.is_file() else None
    if cached is not None:
        logger.info("text embeddings of %d prompts read from %s", len(prompts), path)
        return cached
    embeddings = compute_embeddings(components, prompts)
    _save(path, embeddings)
    logger.info("text embeddings of %d prompts written to %s", len(prompts), path)
    return embeddings


def free_text_encoders(components: SDComponents) -> int:
    """Drop the text encoders (their memory returns to the device once nothing else holds them); returns the
    parameters freed."""
    freed = 0
    for name, encoder in components.text_encoders().items():
        freed += sum(p.numel() for p in encoder.parameters())
        setattr(components, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed


def precompute_text_embeddings(components: SDComponents, prompts: Iterable[str], cache_dir: str = "") -> None:
    """Compute (or read) the embeddings of `prompts` and "" once, attach them to `components` (every
    `encode` then looks them up) and free the text encoders."""
    trained = _adapted_encoders(components)
    if trained:
        raise ValueError(f"train.precompute_text_embeddings: {', '.join(trained)} carries LoRA adapters, so "
                         "its embeddings change as it trains; set train.precompute_text_embeddings=false or "
                         "lora.train_text_encoder=false")
    prompts = prompt_set(prompts, [""])  # "": the guidance negative of SD 1.x / 2.x and SD 3
    components.text_embeddings = load_or_compute(components, prompts, cache_dir)
    freed = free_text_encoders(components)
    table = components.text_embeddings
    size = sum(t.numel() * t.element_size() for t in (table.hidden, table.pooled) if t is not None)
    logger.info("text embeddings of %d prompts computed once (%.1f MiB on the CPU); text encoders freed "
                "(%.2fB parameters)", len(prompts), size / 2**20, freed / 1e9)


def pipeline_embeds(components: SDComponents, prompts: list[str],
                    guidance_scale: float) -> dict[str, torch.Tensor]:
    """The precomputed embeddings of `prompts` keyed by the stock pipeline's argument names (prompt_embeds
    (N, L, D), pooled_prompt_embeds and, with classifier-free guidance, the negatives), for `refl.sampling.
    sample(embeds=...)`: what the pipeline would have encoded itself."""
    cond = encode(components, prompts)
    out = {"prompt_embeds": cond.hidden}
    if cond.pooled is not None:
        out["pooled_prompt_embeds"] = cond.pooled
    if guidance_scale > 1 and not components.guidance_embedded:
        neg = negative(components, cond)
        out["negative_prompt_embeds"] = neg.hidden
        if neg.pooled is not None:
            out["negative_pooled_prompt_embeds"] = neg.pooled
    return out
