"""Pre-train the toy world's tiny Stable Diffusion and save it as a diffusers directory (see
toyworld/pretrain_sd.py). Reproduces `toyworld/assets/toy-sd` from its seed:

    python scripts/pretrain_toy.py --set output_dir=toyworld/assets/toy-sd
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    import torch

    from runkit.config import add_config_args, load_config
    from runkit.logs import setup_logging
    from toyworld.pretrain_sd import PretrainSDConfig, pretrain_toy_sd

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(PretrainSDConfig, args.config, args.overrides)
    report = pretrain_toy_sd(cfg)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
