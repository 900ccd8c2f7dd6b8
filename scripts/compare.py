"""Best-of-N selection against ReFL on held-out prompts -> results.json + report.html.

    python scripts/compare.py --config configs/compare_toy.yaml [--set n_samples=16 --set lora=runs/refl_toy/lora]

Everything happens in evaluation/cli.py (`--help` prints its description).
"""

from __future__ import annotations

from evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
