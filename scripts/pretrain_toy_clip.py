"""Pre-train the toy world's tiny CLIP and ship it as toyworld/assets/toy-clip (fp16).

    python scripts/pretrain_toy_clip.py                     # reproduces the shipped asset
    python scripts/pretrain_toy_clip.py --set steps=100 --set output_dir=runs/clip-smoke
"""

from __future__ import annotations

import argparse
import json

import torch

from runkit.config import add_config_args, load_config
from runkit.logs import setup_logging
from toyworld.pretrain_clip import PretrainClipConfig, pretrain_toy_clip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps runs reproducible)")
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    cfg = load_config(PretrainClipConfig, args.config, args.overrides)
    report = pretrain_toy_clip(cfg)
    summary = {k: v for k, v in report.items() if k != "history"}
    print(json.dumps(summary, indent=2))
    return report


if __name__ == "__main__":
    main()
