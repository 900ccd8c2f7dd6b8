"""The toy world's ReFL settings chosen by a written rule from a small sweep on a demo's critic.

Thin wrapper over `toyworld.cli.sweep_main` (`python scripts/refl_sweep.py --help`); installed as
`social-refl-refl-sweep`."""

import sys

from toyworld.cli import sweep_main as main

if __name__ == "__main__":
    sys.exit(main())
