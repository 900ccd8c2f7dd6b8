"""Decode every image of a pairs set once: a report of the bad rows and a clean copy.

Thin wrapper over `reward.cli.check_main` (`python scripts/check_pairs.py --help`); installed as
`social-refl-check-pairs`."""

import sys

from reward.cli import check_main as main

if __name__ == "__main__":
    sys.exit(main())
