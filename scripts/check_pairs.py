"""Check every image of a pairs set once: a JSON report of the bad rows and a clean parquet copy.

    python scripts/check_pairs.py 'pickapic_v2/data/train-*.parquet' --out clean/train.parquet --num-workers 8

See reward/cli.py (check_main) and reward/data.py (check_pairs)."""

import sys

from reward.cli import check_main as main

if __name__ == "__main__":
    sys.exit(main())
