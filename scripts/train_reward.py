"""Thin wrapper: see reward/cli.py (train_main)."""

import sys

from reward.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
