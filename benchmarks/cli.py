"""What every benchmark command shares: its config from the command line, the device, the JSON result."""

from __future__ import annotations

import json
import logging
from typing import TypeVar

import torch

from runkit.config import config_parser, parse_config_args
from runkit.config import resolve_device as runkit_resolve_device
from runkit.files import write_json
from runkit.logs import setup_logging

T = TypeVar("T")

def parse_config(cls: type[T], description: str, argv: list[str] | None, one_cpu_thread: bool = False) -> T:
    """`--config FILE`, `--set key=value` (repeatable) and `--output-file FILE` over the config dataclass
    `cls` (runkit.config.config_parser, as every command). one_cpu_thread: without CUDA, torch runs one
    thread (shared cores: several spin-wait in OpenMP)."""
    cfg, _ = parse_config_args(config_parser(cls, description, flags=("output_file",)), argv)
    setup_logging(level=logging.WARNING)
    if one_cpu_thread and not torch.cuda.is_available():
        torch.set_num_threads(1)
    return cfg


def resolve_device(name: str, mixed_precision: str = "no") -> torch.device:
    """`device` of a config: "" is CUDA when there is one, else the CPU (fp16 refused on the CPU)."""
    return torch.device(runkit_resolve_device(name, mixed_precision))


def report(result: dict, output_file: str) -> None:
    """Print the result and, when `output_file` is set, write it there (atomically)."""
    print(json.dumps(result, indent=2))
    if output_file:
        write_json(output_file, result)
