"""ReFL's training step and sampling at real size, as JSON.

Thin wrapper over `evaluation.cli.bench_refl_main` (`python scripts/bench_refl.py --help`); installed as
`social-refl-bench-refl`."""

import sys

from evaluation.cli import bench_refl_main as main

if __name__ == "__main__":
    sys.exit(main())
