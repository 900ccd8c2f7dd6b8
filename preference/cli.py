"""Command-line entry point of `preference` (the console script calls it; runkit.cli gives it the error
convention of every command)."""

from __future__ import annotations

import json
import shlex
import sys

from runkit.cli import command
from runkit.config import config_parser, parse_config_args
from runkit.logs import setup_logging


@command
def train_main(argv: list[str] | None = None) -> int:
    """Preference tuning of a Stable Diffusion LoRA on the feedback itself (no critic): Diffusion-DPO on
    preference pairs, or Diffusion-KTO on liked / not-liked images.

    social-refl-train-preference --set data.train=pairs.parquet [--set method=kto] [--resume latest]
    accelerate launch --num_processes 2 "$(which social-refl-train-preference)" --config my.yaml
    """
    from preference.config import PreferenceConfig
    from preference.train import train

    parser = config_parser(PreferenceConfig, train_main.__doc__, flags=("train.output_dir", "train.resume"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    started = ["social-refl-train-preference", *(sys.argv[1:] if argv is None else argv)]
    result = train(cfg, command=shlex.join(started))
    if "lora" in result:  # the main process reports
        print(json.dumps(result, indent=2, default=str))
    return 0
