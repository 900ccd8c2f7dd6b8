"""ReFL at real size: seconds per update by phase, peak memory with and without checkpointing, MFU,
and our sampling / best-of-N against a stock StableDiffusionPipeline (refl/bench.py,
evaluation/harness.py).

    python scripts/bench_refl.py                          # CUDA: SD 1.5 arch, 512 px, batch 8, 40 DDPM steps, bf16
    python scripts/bench_refl.py --set batch=4 --out benchmarks/refl_h100.json
    python scripts/bench_refl.py --set model=toy --set critic=toy-clip --set batch=4   # CPU smoke run
Prints one JSON object and, with --out, writes it there (atomically).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from evaluation.harness import best_of_n_throughput
from refl.bench import BenchConfig, run_benchmark
from runkit.config import load_config
from runkit.files import write_json
from runkit.logs import setup_logging


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a BenchConfig field (model, critic, batch, steps, scheduler, dtype, repeats, ...)")
    p.add_argument("--out", default=None, help="also write the JSON here, e.g. benchmarks/refl_<gpu>.json")
    args = p.parse_args(argv)
    setup_logging(level=logging.WARNING)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # shared CPU cores: one thread avoids OpenMP spin-waits
    result = run_benchmark(load_config(BenchConfig, None, args.overrides),
                           extras={"best_of_n_vs_stock_pipeline": best_of_n_throughput})
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
