"""Generate images with a base model and an optional ReFL LoRA.

Thin wrapper over `refl.cli.generate_main` (`python scripts/generate.py --help`); installed as
`social-refl-generate`."""

import sys

from refl.cli import generate_main as main

if __name__ == "__main__":
    sys.exit(main())
