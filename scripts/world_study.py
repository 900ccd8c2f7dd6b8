"""ReFL variants x training seeds on a finished demo.

Thin wrapper over `toyworld.cli.study_main` (`python scripts/world_study.py --help`); installed as
`social-refl-world-study`."""

import sys

from toyworld.cli import study_main as main

if __name__ == "__main__":
    sys.exit(main())
