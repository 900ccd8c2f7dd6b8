"""Thin wrapper: see reward/cli.py (train_main)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
