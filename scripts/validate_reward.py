"""Pairwise accuracy of a critic on held-out pairs, beside baselines.

Thin wrapper over `reward.cli.validate_main` (`python scripts/validate_reward.py --help`); installed as
`social-refl-validate-reward`."""

import sys

from reward.cli import validate_main as main

if __name__ == "__main__":
    sys.exit(main())
