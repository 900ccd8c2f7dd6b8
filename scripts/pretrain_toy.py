"""Pre-train the toy world's tiny Stable Diffusion.

Thin wrapper over `toyworld.cli.pretrain_sd_main` (`python scripts/pretrain_toy.py --help`); installed as
`social-refl-pretrain-toy-sd`."""

import sys

from toyworld.cli import pretrain_sd_main as main

if __name__ == "__main__":
    sys.exit(main())
