"""The default run on the toy world (make demo).

Thin wrapper over `toyworld.cli.demo_main` (`python scripts/demo.py --help`); installed as
`social-refl-demo`."""

import sys

from toyworld.cli import demo_main as main

if __name__ == "__main__":
    sys.exit(main())
