"""The model card written into every saved LoRA folder (README.md), as diffusers' training scripts do.

It says how the LoRA was made: the base model, what was maximised (the critic or reward models), the
gradient method, how many updates at which learning rate, the validation metrics (each eval/ value at
the last validation and its best, with the update) and the command. The YAML header is what the Hugging
Face Hub reads (base_model, tags), so a folder pushed there (`social-refl-export-lora --push-to-hub`) is
listed as a LoRA of its base model.
"""

from __future__ import annotations

from collections.abc import Sequence

from refl.components import FAMILY_PIPELINES, FLOW_FAMILIES
from refl.config import ReflConfig

# Each family's Hub tag (the one diffusers' LoRA training scripts put on their model cards).
FAMILY_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl", "sd3": "sd3", "flux": "flux"}


def family_row(family: str) -> str:
    """The card's table row naming the base model's family and the stock pipeline that loads the LoRA."""
    return f"| model family | `{family}` (`{FAMILY_PIPELINES[family]}`) |"


def denoiser_word(family: str) -> str:
    """What the LoRA adapts, in a card's words: a UNet family's UNet, a flow family's transformer."""
    return "transformer" if family in FLOW_FAMILIES else "UNet"


def validation_summary(rows: Sequence[dict]) -> dict[str, dict]:
    """Per eval/ metric of metrics.jsonl rows: its last value, its best (highest) and the best's update."""
    out: dict[str, dict] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("eval/") or not isinstance(value, (int, float)):
                continue
            entry = out.setdefault(key, {"last": value, "last_update": row["update"], "best": value,
                                         "best_update": row["update"]})
            entry["last"], entry["last_update"] = value, row["update"]
            if value > entry["best"]:
                entry["best"], entry["best_update"] = value, row["update"]
    return out


def _reward_line(cfg: ReflConfig) -> str:
    r = cfg.reward
    if r.kind == "critic":
        critics = [r.critic] if isinstance(r.critic, str) else list(r.critic)
        if len(critics) == 1:
            return f"Social Reward critic `{critics[0]}`"
        return (f"ensemble of {len(critics)} critics ({', '.join(f'`{c}`' for c in critics)}), mean - "
                f"{r.ensemble_penalty:g} x std")
    if r.kind == "mix":
        return "weighted mix: " + ", ".join(f"{w:g} x `{k}`" for k, w in r.mix.items())
    weights = r.standard.get(r.kind)
    return f"`{r.kind}`" + (f" (weights `{weights}`)" if weights else "")


def export_line(family: str) -> str:
    """How the card tells a user to get a file for the other tools (refl/export.py: the layout they load)."""
    if family in FLOW_FAMILIES:
        return ("For ComfyUI (and Forge, FLUX only): `social-refl-export-lora <this folder>` writes the "
                "diffusers layout they load, with the trained alpha folded into the weights.")
    return "For AUTOMATIC1111, ComfyUI or Forge: `social-refl-export-lora <this folder>` (the kohya layout)."


def model_card(cfg: ReflConfig, updates: int, metrics_rows: Sequence[dict], command: str | None = None,
               family: str = "sd") -> str:
    """README.md text of a LoRA folder saved after `updates` optimizer updates of the run `cfg`;
    `metrics_rows`: the run's metrics.jsonl so far; `command`: how the run was started, when known;
    `family`: the base model's (refl.components.FAMILIES)."""
    t, s, lora = cfg.train, cfg.step, cfg.lora
    pipeline = FAMILY_PIPELINES[family]
    tags = ["lora", "text-to-image", "diffusers", "social-refl", FAMILY_TAGS[family]]
    header = ["---", f"base_model: {cfg.model.name}", "library_name: diffusers", "tags:"]
    header += [f"- {tag}" for tag in tags] + ["---", ""]
    per_update = t.batch_size * t.gradient_accumulation
    text_lora = denoiser_word(family) + (" and text encoder(s)" if lora.train_text_encoder else "")
    lines = [
        f"# ReFL LoRA of {cfg.model.name}", "",
        "Fine-tuned with social-refl: reward-gradient training of a LoRA against a learned reward.", "",
        "| | |", "|---|---|",
        f"| base model | `{cfg.model.name}`" + (f" (VAE `{cfg.model.vae}`)" if cfg.model.vae else "") + " |",
        family_row(family),
        f"| reward | {_reward_line(cfg)} |",
        f"| method | `{s.method}`, {s.num_inference_steps} `{s.scheduler}` steps, cut range {s.cut_range}, "
        f"guidance {s.guidance_scale:g} |",
        f"| regularisers | denoising weight {s.reg_weight:g}, KL weight {s.kl_weight:g} |",
        f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}, on the {text_lora} |",
        f"| updates | {updates} of {t.max_updates} |",
        f"| learning rate | {t.lr:g} (`{t.lr_schedule}`, {t.warmup_updates} warm-up updates), "
        f"`{t.optimizer}` weight decay {t.weight_decay:g} |",
        f"| prompts per update | {per_update} per process ({t.batch_size} x {t.gradient_accumulation} "
        "accumulated) |",
        f"| precision | `{t.mixed_precision}` |",
        f"| seed | {t.seed} |", "",
    ]
    summary = validation_summary([r for r in metrics_rows if r.get("update", 0) <= updates])
    if summary:
        lines += ["## Validation", "",
                  f"{len(t.validation_prompts)} fixed prompts x {t.validation_images_per_prompt} images, "
                  f"{t.validation_num_inference_steps} steps, guidance {t.validation_guidance_scale:g}. "
                  "Judges "
                  "other than the reward never reached the gradient.", "",
                  "| metric | last | at update | best | at update |", "|---|---|---|---|---|"]
        lines += [f"| `{k}` | {v['last']:.4g} | {v['last_update']} | {v['best']:.4g} | {v['best_update']} |"
                  for k, v in sorted(summary.items())]
        if t.select_by:
            lines += ["", f"`lora_best/` holds the LoRA of the validation with the highest `{t.select_by}`."]
        lines.append("")
    else:
        lines += ["## Validation", "", "No validation had run when this LoRA was saved.", ""]
    started = [f"# started with:\n{command}",
               "# or again, every setting from the run folder:"] if command else [
        "# started from Python; the run folder's config.yaml holds every setting:"]
    lines += ["## How it was made", "", "```bash", *started,
              f"social-refl-train-refl --config {t.output_dir}/config.yaml", "```", "",
              "## Use", "", "```python", "import torch",
              f"from diffusers import {pipeline}", "",
              f'pipe = {pipeline}.from_pretrained("{cfg.model.name}", torch_dtype=torch.bfloat16)',
              'pipe.load_lora_weights("path/to/this/folder")', "```", "",
              export_line(family), ""]
    return "\n".join(header + lines)
