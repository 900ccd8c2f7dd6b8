"""Preference pairs from the files people have.

Formats (`fmt`; one record each in `reward.data.formats.PAIR_FORMATS`):
- `social`: Social Reward parquet/CSV with `prompt, pos_path, neg_path` (relative paths resolve
  against the file's folder);
- `pickapic`: Pick-a-Pic v2 parquet with `caption, jpg_0, jpg_1, label_0, label_1` (encoded bytes;
  labels are probabilities summing to 1, a tie is 0.5/0.5);
- `ranked`: ImageRewardDB / HPD v2 style, one row per prompt with `prompt`, `image_path` (a list)
  and `rank` (a list, 1 = best), expanded to every pair of differently (or equally: a tie) ranked images.

A source (`sources`) is a file, a directory or glob of shards (parquet; Arrow files as `datasets` writes
them), or a `datasets` `save_to_disk` folder. `load_pairs` (`memory`) reads a small source into memory;
`PairShards` (`stream`) is the streaming dataset for training: it indexes pairs from the cheap columns only
(labels, ranks, prompts, paths), checked, and reads one row group at a time in DataLoader workers, where
images are decoded (`reward.images.decode_image`), so the table never sits in memory. `PairShardSampler`
gives each process its own row groups. `check_pairs` (`check`) decodes everything once and writes a clean
copy.

Per-image feedback (an image, its prompt, liked or not: `labels`, `LABEL_FORMATS`) streams the same way
(`LabelShards`), with the same bad-row policy.

Bad input raises `DataError` naming the file, the row and the fix; with `on_bad_row="skip"` bad
rows are dropped and the count plus the first offenders are logged. A pair whose two sides are the
same image (same file or same bytes) is a bad row. Labels and paths are checked before any image is
decoded; an image that does not decode, or has no honest 8-bit RGB reading, is a bad row with the reason.
"""

from reward.data.check import check_pairs
from reward.data.errors import FIX, BadRows, DataError, EmptySplitError
from reward.data.formats import (
    PAIR_FORMATS,
    Format,
    ImageRef,
    PairRecord,
    check_format,
    detect_format,
    row_records,
)
from reward.data.labels import LABEL_FORMATS, LabelShards, check_label_format, collate_labelled, label_value
from reward.data.memory import PairDataset, load_pairs, split_by_prompt
from reward.data.pairs import SAME_IMAGE, TIE_POLICIES, collate_pairs, pair_item, prompt_in_val, row_problems
from reward.data.sources import SUFFIX_KINDS, Shard, ShardReader, list_shards, read_tables
from reward.data.stream import PairShards, PairShardSampler

__all__ = [
    "FIX", "LABEL_FORMATS", "PAIR_FORMATS", "SAME_IMAGE", "SUFFIX_KINDS", "TIE_POLICIES", "BadRows",
    "DataError", "EmptySplitError",
    "Format", "ImageRef", "LabelShards", "PairDataset", "PairRecord", "PairShardSampler", "PairShards",
    "Shard", "ShardReader",
    "check_format", "check_label_format", "check_pairs", "collate_labelled", "collate_pairs", "detect_format",
    "label_value", "list_shards", "load_pairs", "pair_item", "prompt_in_val", "read_tables", "row_problems",
    "row_records", "split_by_prompt",
]
