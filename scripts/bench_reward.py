"""Critic throughput, as JSON.

Thin wrapper over `reward.cli.bench_main` (`python scripts/bench_reward.py --help`); installed as
`social-refl-bench-reward`."""

import sys

from reward.cli import bench_main as main

if __name__ == "__main__":
    sys.exit(main())
