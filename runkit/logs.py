"""Logging set-up and the metrics sink of every run.

`setup_logging` is the one place the log format is chosen (INFO on the main process, warnings on the
others). `RunLogger` writes `metrics.jsonl` (one JSON object per logged update) and, if enabled,
TensorBoard scalars and images under `<run>/tb`; only the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_WITH = ("tensorboard", "none")
# accelerate logs every file of every checkpoint at INFO; one line per checkpoint is ours to write.
_CHATTY = ("accelerate.accelerator", "accelerate.checkpointing")


def is_main_process_env() -> bool:
    """Rank 0 by the launcher's environment (before an Accelerator exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _not_an_empty_fp32_list(record: logging.LogRecord) -> bool:
    # diffusers 0.42 warns on every dtype cast of a model, even when its list of modules to keep in float32 is
    # empty (every UNet and VAE the project builds): nothing is kept, so nothing to act on. A non-empty list
    # still warns.
    return "should be kept in float32: []." not in record.getMessage()


def setup_logging(main_process: bool | None = None, level: int = logging.INFO) -> None:
    """`level` on the main process, warnings elsewhere; warnings a user cannot act on are dropped."""
    if main_process is None:
        main_process = is_main_process_env()
    logging.basicConfig(level=level if main_process else logging.WARNING, format=LOG_FORMAT,
                        datefmt="%H:%M:%S")
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers_models = logging.getLogger("diffusers.models.modeling_utils")
    if _not_an_empty_fp32_list not in diffusers_models.filters:
        diffusers_models.addFilter(_not_an_empty_fp32_list)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


class RunLogger:
    """Main-process-only sink: metrics.jsonl always, TensorBoard scalars and images if enabled.

    On resume, records past `resume_update` are dropped (they will be logged again) and TensorBoard
    purges its events after that update too."""

    def __init__(self, out: str | os.PathLike, enabled: bool, log_with: str = "tensorboard",
                 resume_update: int = 0):
        if log_with not in LOG_WITH:
            raise ValueError(f"train.log_with must be one of {LOG_WITH}, got {log_with!r}")
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = [r for r in read_metrics(self.path) if r.get("update", 0) <= resume_update]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if log_with == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / "tb"),
                                        purge_step=resume_update + 1 if resume_update else None)

    def scalars(self, update: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"update": update, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, update)

    def image(self, update: int, tag: str, grid) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, grid, update)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
