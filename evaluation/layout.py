"""Where a comparison run keeps its files, so that the harness that writes them and the report (or the
demo) that reads them share one definition and need not import each other:

    samples/{base,refl}/PPPP.npz   uint8 images (n, H, W, 3), their seeds, the prompt, a fingerprint
    scores/{base,refl}/PPPP.json   per-image scores per evaluator, the selector's diversity
    throughput.json, results.json, report.html (+ report_files/)
"""

from __future__ import annotations

from pathlib import Path


def samples_path(out: Path, model: str, prompt_index: int) -> Path:
    """`model`: "base" or "refl" (evaluation.arms.MODELS)."""
    return out / "samples" / model / f"{prompt_index:04d}.npz"


def scores_path(out: Path, model: str, prompt_index: int) -> Path:
    return out / "scores" / model / f"{prompt_index:04d}.json"
