"""What every benchmark command shares: its config from the command line, the device, the JSON result."""

from __future__ import annotations

import argparse
import json
import logging
from typing import TypeVar

import torch

from runkit.config import add_config_args, load_config
from runkit.files import write_json
from runkit.logs import setup_logging

T = TypeVar("T")

MIXED_PRECISIONS = ("no", "fp16", "bf16")


def check_mixed_precision(value: str) -> None:
    if value not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={value!r}; choose one of {', '.join(MIXED_PRECISIONS)}")


def parse_config(cls: type[T], description: str, argv: list[str] | None, one_cpu_thread: bool = False) -> T:
    """`--config FILE`, `--set key=value` (repeatable) and `--output-file FILE` (`--set output_file=FILE`)
    over the config dataclass `cls`. one_cpu_thread: without CUDA, torch runs one thread (shared cores:
    several spin-wait in OpenMP)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, resume=False)
    parser.add_argument("--output-file", default=None, metavar="FILE",
                        help="also write the JSON result here (same as --set output_file=FILE)")
    args = parser.parse_args(argv)
    extra = [f"output_file={json.dumps(args.output_file)}"] if args.output_file else []
    cfg = load_config(cls, args.config, list(args.overrides) + extra)
    setup_logging(level=logging.WARNING)
    if one_cpu_thread and not torch.cuda.is_available():
        torch.set_num_threads(1)
    return cfg


def resolve_device(name: str) -> torch.device:
    """`device` of a config: "" is CUDA when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def report(result: dict, output_file: str) -> None:
    """Print the result and, when `output_file` is set, write it there (atomically)."""
    print(json.dumps(result, indent=2))
    if output_file:
        write_json(output_file, result)
