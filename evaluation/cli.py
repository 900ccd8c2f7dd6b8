"""Best-of-N selection against ReFL on held-out prompts -> results.json + report.html.

    social-refl-compare --config configs/compare_toy.yaml [--set n_samples=16 --set lora=runs/refl_toy/lora]

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
from pathlib import Path

from evaluation.arms import parse_arm
from evaluation.config import CompareConfig
from evaluation.harness import run_compare
from runkit.cli import command
from runkit.config import config_parser, load_config, parse_config_args
from runkit.logs import setup_logging


def printed_summary(results: dict, output_dir: str) -> dict:
    """What the command prints: where the report is, and the mean score of each arm a reader compares
    (one sample, and best-of the most samples drawn; the intermediate n are in results.json)."""
    largest = {"base": results["n_samples"], "refl": results["n_tuned_samples"]}
    return {"output_dir": output_dir, "report": f"{output_dir}/report.html", "selector": results["selector"],
            "throughput_ratio_vs_stock": (results["throughput"] or {}).get("ratio_vs_stock"),
            "means": {arm: {s: round(v["mean"], 4) for s, v in row["scores"].items()}
                      for arm, row in results["arms"].items() for model, n in [parse_arm(arm)]
                      if n is None or n == largest[model]}}


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


@command
def bench_refl_main(argv: list[str] | None = None) -> int:
    """ReFL's training step per gradient method: seconds per update by phase, peak memory and the forward
    FLOPs checkpointing reruns, each with the method's checkpointing, the other UNet granularity and none;
    MFU; our sampling / best-of-N against a stock StableDiffusionPipeline (refl/bench.py,
    evaluation/harness.py). --memory-model instead predicts SD 1.5's peak memory and s/update at 512 px
    from counts at small resolutions on this machine (refl.bench.memory_model).

        social-refl-bench-refl                          # CUDA: SD 1.5 arch, 512 px, batch 8, 40 DDPM steps, bf16
        social-refl-bench-refl --set batch=4 --out benchmarks/refl_h100.json
        social-refl-bench-refl --set model=sdxl --set batch=2 --out benchmarks/refl_sdxl_h100.json  # 1024 px
        social-refl-bench-refl --set model=toy --set critic=toy-clip --set batch=4   # CPU smoke run
        social-refl-bench-refl --memory-model --out benchmarks/refl_sd15_memory_model.json
        social-refl-bench-refl --memory-model --set model=sdxl --set target_px=1024 --set 'methods=[refl]'
    Prints one JSON object and, with --out, writes it there (atomically).
    """  # noqa: E501
    import dataclasses

    import torch

    from evaluation.harness import best_of_n_throughput
    from refl.bench import BenchConfig, MemoryModelConfig, extend_memory_model, memory_model, run_benchmark
    from runkit.files import write_json

    p = argparse.ArgumentParser(description=bench_refl_main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a BenchConfig field (model, critic, batch, steps, methods, grad_steps, "
                        "dtype, repeats, ...) or, with --memory-model, a MemoryModelConfig field (target_px, "
                        "batches, ...)")
    p.add_argument("--memory-model", action="store_true",
                   help="model SD 1.5's memory at 512 px from small-resolution counts instead of "
                        "benchmarking")
    p.add_argument("--extend", action="store_true",
                   help="with --memory-model: add these methods to the model already in --out (one method "
                        "per process keeps each CPU run short)")
    p.add_argument("--out", default=None, help="also write the JSON here, e.g. benchmarks/refl_<gpu>.json")
    args = p.parse_args(argv)
    if args.extend and not (args.memory_model and args.out):
        p.error("--extend needs --memory-model and --out")
    setup_logging(level=logging.WARNING)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # shared CPU cores: one thread avoids OpenMP spin-waits
    if args.memory_model:
        model_keys = {f.name for f in dataclasses.fields(MemoryModelConfig)}
        mine = [o for o in args.overrides if o.split("=", 1)[0].strip() in model_keys]
        rest = [o for o in args.overrides if o not in mine]
        result = memory_model(load_config(BenchConfig, None, rest),
                              load_config(MemoryModelConfig, None, mine), torch.device("cpu"))
        if args.extend and Path(args.out).is_file():
            result = extend_memory_model(json.loads(Path(args.out).read_text()), result)
    else:
        result = run_benchmark(load_config(BenchConfig, None, args.overrides),
                               extras={"best_of_n_vs_stock_pipeline": best_of_n_throughput})
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return 0
