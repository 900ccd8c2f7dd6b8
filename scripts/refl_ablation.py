"""ReFL variants on a finished demo (same critic, prompts and seeds), each judged against the hidden
taste: the change from base in the critic, the oracle, each oracle term and prompt fidelity.
Writes <demo>/ablation/ablation.json and ablation.md and prints the table. Finished variants are reused.

    python scripts/refl_ablation.py --demo runs/demo                 # the regulariser study (~20 min, 2 cores)
    python scripts/refl_ablation.py --demo runs/demo --variant "kl 1: refl_kl_weight=1" \\
        --variant "longer: refl_updates=240"
"""

import argparse
import sys


def main(argv=None) -> int:
    from runkit.config import ConfigError
    from toyworld.ablation import markdown_table, parse_variant, run_ablation
    from toyworld.demo import setup_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="a finished demo output folder")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME: KEY=VALUE ...'",
                        help="a variant as DemoConfig overrides; repeat for more (default: the regulariser study)")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts to judge on")
    parser.add_argument("--samples", type=int, default=16, help="paired base/ReFL samples per prompt")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        variants = dict(parse_variant(v) for v in args.variant) or None
        summary = run_ablation(args.demo, variants, args.prompts, args.samples)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
