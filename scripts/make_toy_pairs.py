"""A toy-world Social Reward pairs dataset.

Thin wrapper over `toyworld.cli.make_pairs_main` (`python scripts/make_toy_pairs.py --help`); installed as
`social-refl-make-toy-pairs`."""

import sys

from toyworld.cli import make_pairs_main as main

if __name__ == "__main__":
    sys.exit(main())
