"""ReFL LoRA fine-tuning against a Social Reward critic.

Thin wrapper over `refl.cli.train_main` (`python scripts/train_refl.py --help`); installed as
`social-refl-train-refl`."""

import sys

from refl.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
