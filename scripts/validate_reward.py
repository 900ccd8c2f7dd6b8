"""Thin wrapper: see reward/cli.py (validate_main)."""

import sys

from reward.cli import validate_main as main

if __name__ == "__main__":
    sys.exit(main())
