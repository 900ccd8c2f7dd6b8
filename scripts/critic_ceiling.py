"""How well can the critic learn the hidden taste at all? Re-labels a demo run's community images
with the oracle itself (no community noise), fine-tunes the same critic on those pairs, and scores it
against the oracle on the demo's held-out pairs. Prints JSON.

    python scripts/critic_ceiling.py --demo runs/demo
"""

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from toyworld.demo import critic_ceiling, setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished demo output folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the critic's training config, e.g. --set critic.training_mode=all")
    args = parser.parse_args(argv)
    setup_logging()
    print(json.dumps(critic_ceiling(Path(args.demo), args.overrides), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
