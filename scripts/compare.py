"""Best-of-N selection against ReFL on held-out prompts -> results.json + report.html.

Thin wrapper over `evaluation.cli.compare_main` (`python scripts/compare.py --help`); installed as
`social-refl-compare`."""

import sys

from evaluation.cli import compare_main as main

if __name__ == "__main__":
    sys.exit(main())
