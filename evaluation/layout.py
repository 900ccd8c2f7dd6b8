"""Where a comparison run keeps its files, so that the harness that writes them and the report (or the
demo) that reads them share one definition and need not import each other:

    samples/{model}/PPPP.npz       uint8 images (n, H, W, 3), their seeds, the prompt, a fingerprint
    samples/{model}/PPPP-batches/  while prompt PPPP is drawn: each batch as it comes, SSSSSS.npz by the
                                   index of its first sample (removed once PPPP.npz holds them all)
    scores/{model}/PPPP.json       per-image scores per evaluator, the selector's diversity
    throughput.json, results.json, report.html (+ report_files/)
"""

from __future__ import annotations

from pathlib import Path


def samples_path(out: Path, model: str, prompt_index: int) -> Path:
    """`model`: "base" or a tuned model's name (evaluation.arms)."""
    return out / "samples" / model / f"{prompt_index:04d}.npz"


def batches_dir(samples_file: Path) -> Path:
    """Where the batches of an unfinished prompt's samples lie, beside its samples file."""
    return samples_file.with_name(f"{samples_file.stem}-batches")


def batch_path(samples_file: Path, start: int) -> Path:
    """The batch of a prompt's samples that begins at sample `start`."""
    return batches_dir(samples_file) / f"{start:06d}.npz"


def scores_path(out: Path, model: str, prompt_index: int) -> Path:
    return out / "scores" / model / f"{prompt_index:04d}.json"
