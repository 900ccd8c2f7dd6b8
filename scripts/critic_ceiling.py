"""The critic trained on oracle-labelled pairs of a demo's images: its ceiling.

Thin wrapper over `toyworld.cli.critic_ceiling_main` (`python scripts/critic_ceiling.py --help`); installed as `social-refl-critic-ceiling`."""

import sys

from toyworld.cli import critic_ceiling_main as main

if __name__ == "__main__":
    sys.exit(main())
