"""ReFL LoRA fine-tuning of Stable Diffusion against a Social Reward critic.

    python scripts/train_refl.py --config configs/refl_toy.yaml [--set train.lr=1e-4] [--resume latest]
    accelerate launch --num_processes 2 scripts/train_refl.py --config configs/refl_toy.yaml
"""

from __future__ import annotations

import argparse
import json

from refl.train import ReflConfig, setup_logging, train
from runkit.config import add_config_args, load_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--resume", default=None, help='"latest" or a checkpoint directory (sets train.resume)')
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_config(ReflConfig, args.config, overrides)
    setup_logging()
    result = train(cfg)
    if "lora" in result:  # the main process reports
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
