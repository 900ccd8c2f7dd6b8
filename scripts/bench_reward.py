"""Critic throughput benchmark; prints JSON. See reward/bench.py."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import torch

    from reward.bench import run_benchmarks

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["toy-clip", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(json.dumps(run_benchmarks(args.models, args.batch, args.repeats, args.device), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
