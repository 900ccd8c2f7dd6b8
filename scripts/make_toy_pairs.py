"""Write a toy-world Social Reward pairs dataset: OUT/train/pairs.parquet and OUT/heldout/pairs.parquet.

Candidates are renders of varied quality (a generator's stand-in); a simulated community remixes
some of them; remixed vs seen-but-not-remixed images under one prompt become pairs. Prints a JSON
summary with the pair counts and how often the hidden taste (the oracle) agrees with each pair.

    python scripts/make_toy_pairs.py --set output_dir=runs/toy_pairs
    python scripts/make_toy_pairs.py --set n_train_prompts=200 --set community.judgement_noise=0.1
"""

from __future__ import annotations

import argparse
import json

from runkit.config import add_config_args, load_config
from runkit.logs import setup_logging
from toyworld.community import ToyPairsConfig, make_toy_pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(ToyPairsConfig, args.config, args.overrides)
    summary = make_toy_pairs(cfg)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
