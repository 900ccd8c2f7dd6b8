"""Critic throughput benchmark; prints JSON. See reward/bench.py."""

import argparse
import json
import sys


def main(argv=None) -> int:
    import torch

    from reward.bench import run_benchmarks

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["toy-clip", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype for the training step and the extra scoring figure")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--stream-rows", type=int, default=512,
                        help="pairs in the synthetic shard set for streamed loading pairs/s; 0 = skip")
    parser.add_argument("--stream-image-px", type=int, default=512, help="side of the encoded JPEGs (Pick-a-Pic: 512+)")
    parser.add_argument("--stream-image-size", type=int, default=224, help="critic input size they are resized to")
    parser.add_argument("--stream-workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    args = parser.parse_args(argv)
    report = run_benchmarks(args.models, args.batch, args.repeats, args.device, args.precision,
                            args.grad_checkpointing, args.stream_rows, args.stream_image_px,
                            args.stream_image_size, tuple(args.stream_workers))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
