"""ReFL variants on a finished demo, judged against the hidden taste.

Thin wrapper over `toyworld.cli.ablation_main` (`python scripts/refl_ablation.py --help`); installed as
`social-refl-ablation`."""

import sys

from toyworld.cli import ablation_main as main

if __name__ == "__main__":
    sys.exit(main())
