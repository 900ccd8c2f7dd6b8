"""Pre-train the tiny open_clip CLIP ("toy-clip") on toy-world renders, and measure it zero-shot.

Standard CLIP: symmetric InfoNCE over a batch of (render, prompt) pairs with the model's own
learnable logit_scale. Renders come from the training prompts only, drawn fresh every step; zero-shot
accuracy is measured on renders of held-out prompts, per attribute: for each image, the true prompt
competes with the same prompt with that one attribute swapped for every alternative (e.g. 8 colours).

Batches are built from groups of prompts that differ in one attribute ("a red circle at the left"
next to "... at the right"), as hard-negative CLIP training does: with uniformly random batches two
prompts almost never differ only in position, so the loss never asks for position and the model
stays blind to it (zero-shot position 21%, chance 20%, after 500 such steps). Part of the renders
use a random-quality look (faded, off-centre, blurred, grainy; `render.sample_look`) so the
features span the variation a generator's samples show, as web images span good and bad photos.

The result is saved with `SocialReward.save_pretrained` in fp16 (half the bytes; `reward.load`
upcasts because `load_state_dict` copies into the fp32 model). Deterministic from the seed on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from reward.model import CriticConfig, SocialReward, create_critic
from runkit.files import write_json
from toyworld.datasets import render_dataset
from toyworld.render import draw_look, sample_look
from toyworld.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    parse_prompt,
    scene_to_prompt,
    split_prompts,
)

logger = logging.getLogger(__name__)

# The alternatives each zero-shot probe chooses among.
PROBES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
    "size": SIZES,
    "position": POSITIONS,
}


@dataclass
class PretrainClipConfig:
    max_updates: int = 2000  # optimizer steps (fixed, not time-based, so the result is reproducible)
    batch_size: int = 96  # examples per step, rendered fresh from training prompts (negatives = batch - 1)
    group_size: int = 4  # prompts per hard-negative group (one attribute swapped); 1 = uniform batches
    varied_looks: float = 0.5  # share of renders drawn with a random-quality look instead of a plain one
    lr: float = 1.5e-3  # AdamW peak learning rate, after linear warm-up
    warmup_updates: int = 50  # linear warm-up, then cosine decay to 0
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not applied to gains, biases, logit_scale)
    seed: int = 0  # renders, initial weights and batch order
    n_eval_images: int = 1000  # held-out renders for the zero-shot probes
    output_dir: str = "toyworld/assets/toy-clip"  # where the fp16 critic checkpoint is written
    threads: int = 1  # torch CPU threads; 1 keeps runs reproducible (0 = torch's default)


def hard_negative_prompts(rng: np.random.Generator, pool: list[str], batch_size: int,
                          group_size: int) -> list[str]:
    """`batch_size` prompts from `pool`, in groups that share all attributes but one."""
    allowed = set(pool)
    prompts: list[str] = []
    while len(prompts) < batch_size:
        anchor = parse_prompt(pool[rng.integers(len(pool))])
        attr = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
        options = [o for o in PROBES[attr] if o != getattr(anchor, attr)]
        group = [scene_to_prompt(anchor)]
        for k in rng.permutation(len(options)):
            if len(group) >= group_size:
                break
            variant = scene_to_prompt(replace(anchor, **{attr: options[k]}))
            if variant in allowed:  # skips held-out prompts and invisible colour/background pairs
                group.append(variant)
        prompts += group
    return prompts[:batch_size]


def render_batch(prompts: list[str], rng: np.random.Generator, varied_looks: float,
                 size: int = 32) -> np.ndarray:
    """One render per prompt, a `varied_looks` share of them with a random-quality look: (B, S, S, 3)
    uint8."""
    out = np.empty((len(prompts), size, size, 3), dtype=np.uint8)  # (B, S, S, 3)
    for i, prompt in enumerate(prompts):
        scene = parse_prompt(prompt)
        quality = float(rng.uniform()) if rng.uniform() < varied_looks else None
        out[i] = draw_look(scene.shape, sample_look(scene, rng, quality=quality), rng, size)
    return out


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)  # (N, 3, H, W) in [0, 1]


def clip_loss(critic: SocialReward, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE; returns named terms (the loss and the accuracy of the image -> text direction)."""
    img = F.normalize(critic.clip.encode_image(critic.preprocess_tensor(images)), dim=-1)  # (B, D)
    txt = F.normalize(critic.clip.encode_text(tokens), dim=-1)  # (B, D)
    logits = critic.clip.logit_scale.exp() * img @ txt.t()  # (B, B)
    # Two renders of one prompt in a batch are both right: target the text of the same prompt,
    # spreading the mass over duplicates so they are not pushed apart as false negatives.
    same = (tokens[:, None, :] == tokens[None, :, :]).all(-1).float()  # (B, B)
    target = same / same.sum(1, keepdim=True)  # (B, B), symmetric rows
    loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
    acc = same.gather(1, logits.argmax(1, keepdim=True)).mean()
    return {"loss": loss, "contrastive_loss": loss.detach(), "i2t_acc": acc.detach()}


@torch.no_grad()
def zero_shot_accuracy(critic: SocialReward, images: np.ndarray, prompts: list[str],
                       batch_size: int = 256) -> dict[str, float]:
    """Per attribute: share of images whose true prompt beats every one-attribute alternative."""
    critic.eval()
    feats = torch.cat([critic.encode_image(_to_tensor(images[i:i + batch_size]))
                       for i in range(0, len(images), batch_size)])  # (N, D)
    text_cache: dict[str, torch.Tensor] = {}

    def text(ps: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(ps) if p not in text_cache]
        for i in range(0, len(missing), batch_size):
            chunk = missing[i:i + batch_size]
            for p, e in zip(chunk, critic.encode_text(chunk)):
                text_cache[p] = e
        return torch.stack([text_cache[p] for p in ps])  # (k, D)

    out: dict[str, float] = {}
    for attr, options in PROBES.items():
        hits = []
        for feat, prompt in zip(feats, prompts):
            scene = parse_prompt(prompt)
            alts = [scene_to_prompt(replace(scene, **{attr: o})) for o in options]
            sims = text(alts) @ feat  # (k,)
            hits.append(options[int(sims.argmax())] == getattr(scene, attr))
        out[f"zero_shot_{attr}"] = float(np.mean(hits))
        out[f"chance_{attr}"] = 1.0 / len(options)
    # Full retrieval: the true prompt among all distinct evaluation prompts.
    distinct = sorted(set(prompts))
    sims = feats @ text(distinct).t()  # (N, P)
    truth = torch.tensor([distinct.index(p) for p in prompts])
    out["retrieval_top1"] = float((sims.argmax(1) == truth).float().mean())
    out["chance_retrieval"] = 1.0 / len(distinct)
    return out


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Gains, biases, embeddings' positions and the temperature are not shrunk toward 0.
        (no_decay if p.ndim < 2 or "logit_scale" in name or "positional" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain_toy_clip(cfg: PretrainClipConfig) -> dict:
    """Train, evaluate zero-shot (before and after), save fp16 to `cfg.output_dir`; returns a report."""
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    train_prompts = split_prompts()[0]
    eval_np, eval_prompts = render_dataset(cfg.n_eval_images, seed=cfg.seed + 1, split="heldout")
    critic = create_critic(CriticConfig(model_name="toy-clip", training_mode="all"))
    image_size = critic.image_size
    before = zero_shot_accuracy(critic, eval_np, eval_prompts)
    n_params = sum(p.numel() for p in critic.clip.parameters() if p.requires_grad)
    logger.info("toy-clip: %.2fM trainable parameters; %d steps x batch %d fresh renders of %d training "
                "prompts",
                n_params / 1e6, cfg.max_updates, cfg.batch_size, len(train_prompts))

    opt = torch.optim.AdamW(_param_groups(critic.clip, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                            eps=1e-6)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_updates:
            return cfg.lr * (step + 1) / cfg.warmup_updates
        progress = (step - cfg.warmup_updates) / max(1, cfg.max_updates - cfg.warmup_updates)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    rng = np.random.default_rng(cfg.seed)
    history = []
    critic.train()
    bar = tqdm(range(cfg.max_updates), desc="pretrain toy-clip")
    for step in bar:
        prompts = hard_negative_prompts(rng, train_prompts, cfg.batch_size, cfg.group_size)
        images = _to_tensor(render_batch(prompts, rng, cfg.varied_looks, image_size))  # (B, 3, S, S)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        terms = clip_loss(critic, images, critic.tokenize(prompts))
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        with torch.no_grad():  # as in CLIP: cap the temperature at 100 so logits cannot blow up
            critic.clip.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == cfg.max_updates - 1:
            history.append({"step": step, "train/loss": float(terms["contrastive_loss"]),
                            "train/i2t_acc": float(terms["i2t_acc"])})
            bar.set_postfix(loss=f"{float(terms['contrastive_loss']):.3f}",
                            acc=f"{float(terms['i2t_acc']):.2f}")
    train_seconds = time.perf_counter() - t0
    after = zero_shot_accuracy(critic, eval_np, eval_prompts)
    critic.half().save_pretrained(cfg.output_dir)  # fp16 on disk; `reward.load` upcasts into an fp32 model
    critic.float()
    weights = Path(cfg.output_dir) / "critic.safetensors"
    report = {"config": asdict(cfg), "train_seconds": round(train_seconds, 1),
              "logit_scale": round(critic.clip.logit_scale.exp().item(), 3), "eval/before": before,
              "eval/after": {k: v for k, v in after.items()}, "weights_bytes": weights.stat().st_size,
              "history": history}
    write_json(Path(cfg.output_dir) / "pretrain_report.json", report)
    logger.info("saved %s (%.1f MB); zero-shot colour %.3f shape %.3f background %.3f, retrieval %.3f",
                weights, weights.stat().st_size / 1e6, after["zero_shot_colour"], after["zero_shot_shape"],
                after["zero_shot_background"], after["retrieval_top1"])
    return report
