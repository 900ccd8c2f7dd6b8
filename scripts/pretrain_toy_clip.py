"""Pre-train the toy world's tiny CLIP.

Thin wrapper over `toyworld.cli.pretrain_clip_main` (`python scripts/pretrain_toy_clip.py --help`); installed
as `social-refl-pretrain-toy-clip`."""

import sys

from toyworld.cli import pretrain_clip_main as main

if __name__ == "__main__":
    sys.exit(main())
