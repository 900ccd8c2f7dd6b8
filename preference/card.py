"""The model card (README.md) of every LoRA folder a preference run saves: how it was made (base model,
method, beta, the feedback, LoRA, updates, learning rate), the validation metrics (refl.card's summary of
metrics.jsonl) and how to load it. Its YAML header is what the Hugging Face Hub reads."""

from __future__ import annotations

from collections.abc import Sequence

from preference.config import PreferenceConfig
from refl.card import FAMILY_TAGS, denoiser_word, family_row, validation_summary
from refl.components import FAMILY_PIPELINES, FLOW_FAMILIES

METHOD_NAMES = {"dpo": "Diffusion-DPO on preference pairs",
                "kto": "Diffusion-KTO on liked / not-liked images"}


def model_card(cfg: PreferenceConfig, updates: int, metrics_rows: Sequence[dict], command: str | None = None,
               family: str = "sd") -> str:
    """README.md text of a LoRA saved after `updates` updates of the run `cfg`; `metrics_rows`: the run's
    metrics.jsonl so far; `command`: how the run was started, when known; `family`: the base model's."""
    t, lora = cfg.train, cfg.lora
    pipeline = FAMILY_PIPELINES[family]
    tags = ["lora", "text-to-image", "diffusers", "social-refl", cfg.method, FAMILY_TAGS[family]]
    lines = ["---", f"base_model: {cfg.model.name}", "library_name: diffusers", "tags:",
             *[f"- {tag}" for tag in tags], "---", "",
             f"# {cfg.method.upper()} LoRA of {cfg.model.name}", "",
             f"Tuned with social-refl by {METHOD_NAMES[cfg.method]}, straight from the feedback (no "
             "critic).", "",
             "| | |", "|---|---|",
             f"| base model | `{cfg.model.name}` |", family_row(family),
             f"| method | `{cfg.method}`, beta {cfg.beta:g}"
             + (f", weights liked {cfg.desirable_weight:g} / not liked {cfg.undesirable_weight:g}"
                if cfg.method == "kto" else "")
             + (f"; flow form: sigma `{cfg.timestep_density}`, velocity target"
                + (f", guidance embedding {cfg.guidance_scale:g}" if family == "flux" else "")
                if family in FLOW_FAMILIES else "") + " |",
             f"| feedback | `{cfg.data.train}` (format `{cfg.data.format}`) |",
             f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}"
             + f", {denoiser_word(family)}" + (" and text encoder(s)" if lora.train_text_encoder else "")
             + " |",
             f"| updates | {updates} of {t.max_updates} |",
             f"| learning rate | {t.lr:g} (`{t.lr_schedule}`), `{t.optimizer}` |",
             f"| examples per update | {t.batch_size} x {t.gradient_accumulation} per process |",
             f"| precision | `{t.mixed_precision}` |", f"| seed | {t.seed} |", ""]
    summary = validation_summary([r for r in metrics_rows if r.get("update", 0) <= updates])
    lines += ["## Validation", ""]
    if summary:
        lines += ["| metric | last | at update | best | at update |", "|---|---|---|---|---|"]
        lines += [f"| `{k}` | {v['last']:.4g} | {v['last_update']} | {v['best']:.4g} | {v['best_update']} |"
                  for k, v in sorted(summary.items())]
    else:
        lines.append("No validation had run when this LoRA was saved.")
    lines += ["", "## How it was made", "", "```bash",
              command or "# started from Python; the run folder's config.yaml holds every setting",
              "# again, every setting from the run folder:",
              f"social-refl-train-preference --config {t.output_dir}/config.yaml",
              "```", "", "## Use", "", "```python", f"from diffusers import {pipeline}", "",
              f'pipe = {pipeline}.from_pretrained("{cfg.model.name}")',
              'pipe.load_lora_weights("path/to/this/folder")', "```", ""]
    return "\n".join(lines)
