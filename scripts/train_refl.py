"""ReFL LoRA fine-tuning of Stable Diffusion against a Social Reward critic.

    python scripts/train_refl.py --config configs/refl_toy.yaml [--set train.lr=1e-4] [--resume latest]
    accelerate launch --num_processes 2 scripts/train_refl.py --config configs/refl_toy.yaml
"""

from __future__ import annotations

import argparse
import json

from refl.config import ReflConfig
from refl.train import train
from runkit.config import add_config_args, config_overrides, load_config
from runkit.logs import setup_logging


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = load_config(ReflConfig, args.config, config_overrides(args))
    setup_logging()
    result = train(cfg)
    if "lora" in result:  # the main process reports
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
