"""The default run on the toy world: community data -> critic -> ReFL -> best-of-64 comparison -> report.

    python scripts/demo.py --out runs/demo            # about 15 minutes on a 2-core CPU
    python scripts/demo.py --out runs/demo-quick --quick
Rerunning with the same --out resumes: finished stages are reused.
"""

import argparse
import sys


def main(argv=None) -> int:
    from toyworld.demo import demo_main

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output folder (report.html lands here)")
    parser.add_argument("--quick", action="store_true", help="a small run (about 3 minutes) for smoke tests")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DemoConfig field, e.g. --set refl.train.max_updates=30")
    parser.add_argument("--until", default="compare", choices=["community", "critic", "refl", "compare"],
                        help="stop after this stage (e.g. community: look at the feedback before training on it)")
    args = parser.parse_args(argv)
    return demo_main(args.out, args.quick, args.overrides, args.until)


if __name__ == "__main__":
    sys.exit(main())
