"""Thin wrapper: see reward/cli.py (train_main)."""

import sys

from reward.cli import train_main as main

if __name__ == "__main__":
    sys.exit(main())
