"""Best-of-N selection against ReFL on held-out prompts -> results.json + report.html.

    python scripts/compare.py --config configs/compare_toy.yaml [--set n_samples=16 --set lora=runs/refl_toy/lora]

Samples are stored per prompt under <output_dir>/samples and reused on a rerun, so an interrupted
run resumes. See refl/compare.py for the arms and refl/report.py for the report.

Look at the report headless (Debian: `apt-get install -y chromium`):

    chromium --headless --no-sandbox --disable-gpu --screenshot=out.png --window-size=1200,1600 \
        file://$PWD/runs/compare_toy/report.html
"""

from __future__ import annotations

import argparse
import json
import logging

from refl.compare import CompareConfig, run_compare
from runkit.config import ConfigError, add_config_args, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(CompareConfig, args.config, args.overrides)
    except ConfigError as err:
        logging.getLogger("compare").error("%s", err)
        return 2
    results = run_compare(cfg)
    arms = results["arms"]
    sel = results["selector"]
    summary = {"output_dir": cfg.output_dir, "report": f"{cfg.output_dir}/report.html",
               "selector": sel, "throughput_ratio_vs_stock": (results["throughput"] or {}).get("ratio_vs_stock"),
               "means": {arm: {s: round(v["mean"], 4) for s, v in row["scores"].items()} for arm, row in arms.items()
                         if not arm.startswith(("base_best_of", "refl_best_of"))
                         or arm.endswith(f"_of_{results['n_samples']}") or arm.endswith(f"_of_{results['refl_samples']}")}}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
