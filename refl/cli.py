"""Command-line entry points of `refl`: training, generation and LoRA export (the console scripts call
these; runkit.cli gives every command its error convention)."""

from __future__ import annotations

import json
import shlex
import sys

from runkit.cli import command
from runkit.config import config_parser, parse_config_args, resolve_device, save_config
from runkit.files import check_output_dir
from runkit.logs import setup_logging


@command
def train_main(argv: list[str] | None = None) -> int:
    """ReFL LoRA fine-tuning of Stable Diffusion against a Social Reward critic.

    social-refl-train-refl --config configs/refl_toy.yaml [--set train.lr=1e-4] [--resume latest]
    accelerate launch --num_processes 2 "$(which social-refl-train-refl)" --config configs/refl_toy.yaml
    """
    from refl.config import ReflConfig
    from refl.train import train

    parser = config_parser(ReflConfig, train_main.__doc__, flags=("train.output_dir", "train.resume"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    started = ["social-refl-train-refl", *(sys.argv[1:] if argv is None else argv)]
    result = train(cfg, command=shlex.join(started))
    if "lora" in result:  # the main process reports
        print(json.dumps(result, indent=2, default=str))
    return 0


@command
def generate_main(argv: list[str] | None = None) -> int:
    """Generate images with a base model and an optional ReFL LoRA.

    social-refl-generate --model DIR --lora runs/refl_toy/lora --prompts-file prompts.txt \\
        --images-per-prompt 4 --seed 0 [--batch-size 8] [--mixed-precision bf16] [--critic DIR] --out runs/gen
    """
    from refl.config import GenerateConfig
    from refl.generate import generate, load_pipeline, prepare_output
    from refl.lora import check_lora_dir
    from refl.prompts import read_prompt_file

    parser = config_parser(GenerateConfig, generate_main.__doc__, flags=(
        "model.name", "model.vae", "lora", "lora_scale", "prompts_file", "prompt_column", "images_per_prompt",
        "seed", "num_inference_steps", "guidance_scale", "scheduler", "critic", "batch_size",
        "mixed_precision", "device",
        "output_dir", "overwrite"), required=("model.name", "prompts_file", "output_dir"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    prompts = read_prompt_file(cfg.prompts_file, column=cfg.prompt_column, key="prompts_file",
                               column_key="prompt_column")
    # Every input before the model loads (minutes for SDXL): a typo costs nothing.
    resolve_device(cfg.device, cfg.mixed_precision)
    check_output_dir(cfg.output_dir, "--out")
    if cfg.lora:
        check_lora_dir(cfg.lora)
    if cfg.critic:
        from reward.standard import check_spec

        check_spec(cfg.critic)
    # The resolved config first, beside the images it will describe: nothing to lose at the end of the run.
    save_config(cfg, prepare_output(cfg.output_dir, cfg.overwrite) / "config.yaml")
    pipe = load_pipeline(cfg.model.name, cfg.lora or None, cfg.lora_scale, cfg.device or None,
                         attention=cfg.model.attention, mixed_precision=cfg.mixed_precision,
                         vae=cfg.model.vae, scheduler=cfg.scheduler)
    critic = None
    if cfg.critic:
        import reward

        critic = reward.load(cfg.critic, device=pipe.device)
    records = generate(pipe, prompts, cfg.output_dir, n=cfg.images_per_prompt, seed=cfg.seed,
                       num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                       critic=critic, batch_size=cfg.batch_size, overwrite=True)
    print(json.dumps({"images": len(records), "output_dir": cfg.output_dir}))
    return 0


@command
def feed_main(argv: list[str] | None = None) -> int:
    """Draw a feed: a model's images (base, or base + LoRA) for prompts x seeds x guidance scales, with a
    manifest (feed.parquet: prompt, image, seed, guidance_scale, model, lora) that the feedback readers take
    once likes (a label column) or remixes (a pairs file in the folder) are attached.

    social-refl-feed --model DIR [--lora runs/refl/lora] --prompts-file prompts.txt \\
        --guidance-scales 2 4 7.5 --n-seeds 2 --seed 0 [--batch-size 8] --out runs/feed
    """
    from refl.feed import FeedConfig, prepare_feed_folder, write_feed
    from refl.generate import load_pipeline
    from refl.lora import check_lora_dir
    from refl.prompts import read_prompt_file

    parser = config_parser(FeedConfig, feed_main.__doc__, flags=(
        "model.name", "model.vae", "lora", "lora_scale", "prompts_file", "prompt_column", "guidance_scales",
        "n_seeds", "seed", "num_inference_steps", "scheduler", "batch_size", "mixed_precision", "device",
        "output_dir", "overwrite"), required=("model.name", "prompts_file", "output_dir"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    prompts = read_prompt_file(cfg.prompts_file, column=cfg.prompt_column, key="prompts_file",
                               column_key="prompt_column")
    if cfg.lora:  # every input before the model loads
        check_lora_dir(cfg.lora)
    save_config(cfg, prepare_feed_folder(cfg.output_dir, cfg.overwrite) / "config.yaml")
    pipe = load_pipeline(cfg.model.name, cfg.lora or None, cfg.lora_scale, cfg.device or None,
                         attention=cfg.model.attention, mixed_precision=cfg.mixed_precision,
                         vae=cfg.model.vae, scheduler=cfg.scheduler)
    manifest = write_feed(pipe, prompts, cfg.output_dir, cfg.guidance_scales, cfg.n_seeds, cfg.seed,
                          cfg.num_inference_steps, cfg.batch_size, overwrite=True,
                          drawn_by={"model": cfg.model.name, "lora": cfg.lora, "lora_scale": cfg.lora_scale,
                                    "scheduler": cfg.scheduler})
    print(json.dumps({"images": len(manifest), "output_dir": cfg.output_dir}))
    return 0


@command
def export_main(argv: list[str] | None = None) -> int:
    """Export a saved LoRA folder for other tools (the layout they load for its model: kohya for UNet LoRAs,
    AUTOMATIC1111, ComfyUI, Forge; diffusers for SD 3 / FLUX LoRAs, ComfyUI, Forge), and optionally upload the
    folder to the Hugging Face Hub.

    social-refl-export-lora runs/refl_sdxl/lora [--layout kohya] [--output-file my_lora.safetensors] \\
        [--push-to-hub user/my-lora [--private]]
    """
    from refl.config import ExportConfig
    from refl.export import export_lora, push_to_hub

    parser = config_parser(ExportConfig, export_main.__doc__, positional=("lora",),
                           flags=("layout", "output_file", "overwrite", "push_to_hub", "private"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    from refl.export import layout_for

    layout = cfg.layout or layout_for(cfg.lora)
    out = export_lora(cfg.lora, layout, cfg.output_file or None, cfg.overwrite)
    result = {"layout": layout, "output_file": str(out)}
    if cfg.push_to_hub:
        result["hub"] = push_to_hub(cfg.lora, cfg.push_to_hub, cfg.private)
    print(json.dumps(result))
    return 0
