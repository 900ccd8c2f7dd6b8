"""Where each stage of the demo keeps its outputs in a run folder. Stages read their inputs from here, never
from paths stored in an earlier stage's JSON, so a copied run folder uses its own files."""

from __future__ import annotations

from pathlib import Path


# Where each stage's outputs lie in a run folder. Stages read their inputs from here, never from paths stored
# in an earlier stage's JSON (which are relative to the run folder anyway): a copied run folder uses its own
# files.
def community_pairs_file(run: Path) -> Path:
    return run / "community" / "train" / "pairs.parquet"


def oracle_pairs_file(run: Path) -> Path:
    return run / "community" / "oracle_pairs" / "pairs.parquet"


def feed_oracle_pairs_file(run: Path) -> Path:
    """The community's feed ordered by the oracle: what the critic's ceiling trains on."""
    return run / "community" / "feed_oracle_pairs" / "pairs.parquet"


def critic_dirs(critic_stage: Path, members: int) -> list[str]:
    """The critic directories of a critic stage's folder: the first critic, then members 1 .. members - 1."""
    return [str(critic_stage / "critic")] + [str(critic_stage / f"member-{k}" / "critic")
                                             for k in range(1, members)]


def refl_result(refl_stage: Path, result: dict) -> dict:
    """A ReFL stage's result with its LoRA folders in `refl_stage`, wherever the stage first ran."""
    located = dict(result, output_dir=str(refl_stage), lora=str(refl_stage / "lora"))
    if "lora_best" in result:
        located["lora_best"] = str(refl_stage / "lora_best")
    return located
