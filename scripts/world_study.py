"""ReFL variants with several training seeds on a finished demo, against base and base best-of-N, judged
by the critic, the zero-shot CLIP, the oracle, each oracle term and prompt fidelity: the mean and the
spread across seeds beside each seed's per-prompt intervals. Writes <demo>/study/<study>.json and .md.

    python scripts/world_study.py --demo runs/demo                  # plain ReFL, seeds 0 1 2 (0 = the demo's run)
    python scripts/world_study.py --demo runs/demo --study guard    # ReFL against the hacking guards
    python scripts/world_study.py --demo runs/demo --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from toyworld.demo import setup_logging
    from toyworld.study import DEFAULT_SEEDS, STUDIES, markdown_table, run_study

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished demo output folder")
    parser.add_argument("--study", default="world", choices=sorted(STUDIES),
                        help="world: plain ReFL; guard: plain ReFL against selection, an ensemble, and both")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="ReFL training seeds")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        summary = run_study(args.demo, args.seeds, study=args.study)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
