"""Fine-tune a Social Reward critic on preference pairs.

Thin wrapper over `reward.cli.train_main` (`python scripts/train_reward.py --help`); installed as
`social-refl-train-reward`."""

import sys

from reward.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
