"""Thin wrapper: see reward/cli.py (validate_main)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward.cli import validate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(validate_main())
