"""Best-of-N selection against tuned models on held-out prompts -> results.json + report.html.

    social-refl-compare --config configs/compare_toy.yaml [--set n_samples=16 --set lora=runs/refl_toy/lora]
    social-refl-compare --config configs/compare_toy.yaml --set loras.dpo=runs/dpo/lora \
        --set loras.kto=runs/kto/lora      # more tuned models beside ReFL, each on the same seeds

Samples are stored per prompt under <output_dir>/samples and reused on a rerun, so an interrupted
run resumes. See evaluation/harness.py for the arms and evaluation/report.py for the report.

Look at the report headless (Debian: `apt-get install -y chromium`):

    chromium --headless --no-sandbox --disable-gpu --screenshot=out.png --window-size=1200,1600 \
        file://$PWD/runs/compare_toy/report.html
"""

from __future__ import annotations

import json

from evaluation.arms import BASE, parse_arm
from evaluation.config import CompareConfig
from evaluation.harness import run_compare
from runkit.cli import command
from runkit.config import config_parser, parse_config_args
from runkit.logs import setup_logging


def printed_summary(results: dict, output_dir: str) -> dict:
    """What the command prints: where the report is, and the mean score of each arm a reader compares
    (one sample, and best-of the most samples drawn; the intermediate n are in results.json)."""
    def largest(model: str) -> int:
        return results["n_samples"] if model == BASE else results["n_tuned_samples"]

    return {"output_dir": output_dir, "report": f"{output_dir}/report.html", "selector": results["selector"],
            "throughput_ratio_vs_stock": (results["throughput"] or {}).get("ratio_vs_stock"),
            "means": {arm: {s: round(v["mean"], 4) for s, v in row["scores"].items()}
                      for arm, row in results["arms"].items() for model, n in [parse_arm(arm)]
                      if n is None or n == largest(model)}}


@command
def compare_main(argv: list[str] | None = None) -> int:
    # A rerun reuses its stored samples by itself: no --resume.
    parser = config_parser(CompareConfig, __doc__, flags=(
        "model.name", "lora", "prompts_file", "n_samples", "critic", "evaluators", "mixed_precision",
        "device", "output_dir"))
    cfg, _ = parse_config_args(parser, argv)
    setup_logging()
    results = run_compare(cfg)
    print(json.dumps(printed_summary(results, cfg.output_dir), indent=2))
    return 0
