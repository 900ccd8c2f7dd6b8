"""Command-line entry points of `refl`: training, generation and LoRA export (scripts/ and the console
scripts wrap these; runkit.cli gives every command its error convention)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from runkit.cli import command
from runkit.config import add_config_args, config_overrides, load_config
from runkit.logs import setup_logging


@command
def train_main(argv: list[str] | None = None) -> int:
    """ReFL LoRA fine-tuning of Stable Diffusion against a Social Reward critic.

    social-refl-train-refl --config configs/refl_toy.yaml [--set train.lr=1e-4] [--resume latest]
    accelerate launch --num_processes 2 scripts/train_refl.py --config configs/refl_toy.yaml
    """
    from refl.config import ReflConfig
    from refl.train import train

    parser = argparse.ArgumentParser(description=train_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(ReflConfig, args.config, config_overrides(args))
    setup_logging()
    started = ["social-refl-train-refl", *(sys.argv[1:] if argv is None else argv)]
    result = train(cfg, command=shlex.join(started))
    if "lora" in result:  # the main process reports
        print(json.dumps(result, indent=2, default=str))
    return 0


@command
def generate_main(argv: list[str] | None = None) -> int:
    """Generate images with a base model and an optional ReFL LoRA.

    social-refl-generate --model DIR --lora runs/refl_toy/lora --prompts prompts.txt --n 4 --seed 0 \\
        [--batch-size 8] [--dtype bf16] [--lora-scale 1.0] [--critic CKPT] --out runs/gen
    """
    from refl.generate import generate, load_pipeline, prepare_output
    from refl.prompts import read_prompt_file

    p = argparse.ArgumentParser(description=generate_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="diffusers directory (SD 1.x/2.x or SDXL), cached model id, or preset "
                        "(toy/tiny/tiny-sdxl)")
    p.add_argument("--lora", default=None, help="LoRA directory in diffusers format")
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplier of the LoRA update")
    p.add_argument("--prompts", required=True,
                   help="prompts file: .txt (one per line), .parquet or .csv (prompt column)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed + k")
    p.add_argument("--steps", type=int, default=40, help="sampler steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--critic", default=None, help="critic checkpoint dir or open_clip name to score each "
                                                  "image")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (seeds do not depend "
                                                             "on it)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights and activations (fp16 needs a GPU)")
    p.add_argument("--vae", default=None,
                   help="another VAE (folder or hub id), e.g. an fp16-safe SDXL VAE for --dtype fp16")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images of an earlier generation in --out (refused without it)")
    args = p.parse_args(argv)
    setup_logging()
    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        raise ValueError(f"--n, --batch-size and --steps must be at least 1, got {args.n}, {args.batch_size} "
                         f"and {args.steps}")
    prompts = read_prompt_file(args.prompts, key="--prompts", column_key="the prompt column")
    prepare_output(args.out, args.overwrite)  # before the model loads: a refused folder costs nothing
    pipe = load_pipeline(args.model, args.lora, args.lora_scale, args.device, dtype=args.dtype, vae=args.vae)
    critic = None
    if args.critic:
        import reward

        critic = reward.load(args.critic, device=pipe.device)
    records = generate(pipe, prompts, args.out, n=args.n, seed=args.seed, num_inference_steps=args.steps,
                       guidance_scale=args.guidance, critic=critic, batch_size=args.batch_size,
                       overwrite=True)
    print(json.dumps({"images": len(records), "out": args.out}))
    return 0


@command
def export_main(argv: list[str] | None = None) -> int:
    """Export a saved LoRA folder for other tools (kohya layout: AUTOMATIC1111, ComfyUI, Forge), and
    optionally upload the folder to the Hugging Face Hub.

    social-refl-export-lora runs/refl_sdxl/lora --format kohya [--out my_lora.safetensors] \\
        [--push-to-hub user/my-lora [--private]]
    """
    from refl.export import FORMATS, export_lora, push_to_hub

    p = argparse.ArgumentParser(description=export_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lora", help="LoRA folder saved by ReFL training (its lora/ or lora_best/)")
    p.add_argument("--format", default="kohya", choices=sorted(FORMATS), help="layout of the exported file")
    p.add_argument("--out", default=None, help="exported .safetensors file (default: inside the LoRA folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="also upload the folder (weights, model card, export) to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = p.parse_args(argv)
    setup_logging()
    out = export_lora(args.lora, args.format, args.out, args.overwrite)
    result = {"format": args.format, "file": str(out)}
    if args.push_to_hub:
        result["hub"] = push_to_hub(args.lora, args.push_to_hub, args.private)
    print(json.dumps(result))
    return 0
