"""Best-of-N selection against ReFL on held-out prompts -> results.json + report.html.

    python scripts/compare.py --config configs/compare_toy.yaml [--set n_samples=16 --set lora=runs/refl_toy/lora]

Samples are stored per prompt under <output_dir>/samples and reused on a rerun, so an interrupted
run resumes. See evaluation/harness.py for the arms and evaluation/report.py for the report.

Look at the report headless (Debian: `apt-get install -y chromium`):

    chromium --headless --no-sandbox --disable-gpu --screenshot=out.png --window-size=1200,1600 \
        file://$PWD/runs/compare_toy/report.html
"""

from __future__ import annotations

import argparse
import json
import logging

from evaluation.config import CompareConfig
from evaluation.harness import run_compare
from runkit.config import ConfigError, add_config_args, load_config


def headline(results: dict, output_dir: str) -> dict:
    """What the script prints: where the report is, and the mean score of each arm a reader compares
    (one sample, and best-of the most samples drawn; the intermediate n are in results.json)."""
    largest = (f"_of_{results['n_samples']}", f"_of_{results['refl_samples']}")
    return {"output_dir": output_dir, "report": f"{output_dir}/report.html", "selector": results["selector"],
            "throughput_ratio_vs_stock": (results["throughput"] or {}).get("ratio_vs_stock"),
            "means": {arm: {s: round(v["mean"], 4) for s, v in row["scores"].items()}
                      for arm, row in results["arms"].items()
                      if not arm.startswith(("base_best_of", "refl_best_of")) or arm.endswith(largest)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(CompareConfig, args.config, args.overrides)
    except ConfigError as err:
        logging.getLogger("compare").error("%s", err)
        return 2
    results = run_compare(cfg)
    print(json.dumps(headline(results, cfg.output_dir), indent=2))
    return 0
