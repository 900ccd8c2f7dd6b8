"""Streaming pairs: shard sets, `datasets` folders, disjoint shares, bad rows, the checking pass, memory."""

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.pairs import encoded_image, pickapic_rows, write_shards
from PIL import Image

from reward.data import DataError, PairShards, PairShardSampler, collate_pairs, load_pairs

ROOT = Path(__file__).resolve().parents[1]


def test_shard_folder_streams_the_same_pairs_as_loading_it(tmp_path):
    rows = pickapic_rows(60)
    write_shards(tmp_path / "data", rows)
    ds = PairShards(tmp_path / "data", image_size=16, tie_policy="drop")
    in_memory = load_pairs(str(tmp_path / "data" / "train-*.parquet"), tie_policy="drop")
    assert len(ds) == len(in_memory) == 40 and ds.n_ties_dropped == 20
    items = [ds[i] for i in range(len(ds))]
    assert sorted(it["prompt"] for it in items) == sorted(r.prompt for r in in_memory)
    assert items[0]["pos"].shape == (3, 16, 16)  # 8 px images resized up to the critic's size
    # label_0 = 0 -> jpg_1 preferred: the streamed pos image is jpg_1's pixels
    row = next(r for r in rows if r["label_0"] == 0.0)
    item = items[[it["prompt"] for it in items].index(row["caption"])]
    by_hand = load_pairs(pd.DataFrame([row]))[0]
    assert by_hand.pos == row["jpg_1"]
    from reward.model import load_image_tensor

    assert torch.equal(item["pos"], load_image_tensor(Image.open(io.BytesIO(row["jpg_1"])), 16))
    keep = PairShards(tmp_path / "data", image_size=16, tie_policy="keep")
    assert len(keep) == 60 and (keep.labels == 0.5).sum() == 20
    half = PairShards(tmp_path / "data", image_size=16, tie_policy="half")
    tie = next(i for i in range(len(half)) if half.labels[i] == 0.5)
    assert (half[tie]["label"].item(), half[tie]["weight"].item()) == (1.0, 0.5)


def test_folder_with_several_splits_or_a_datasetdict_names_the_fix(tmp_path):
    write_shards(tmp_path / "data", pickapic_rows(6), n_shards=1)
    write_shards(tmp_path / "data", pickapic_rows(6), n_shards=1, split="validation_unique")
    with pytest.raises(DataError, match=r"several splits \(train, validation_unique\).*-\*\.parquet"):
        PairShards(tmp_path, image_size=16)
    assert len(PairShards(str(tmp_path / "data" / "validation_unique-*.parquet"), image_size=16)) == 4
    with pytest.raises(DataError, match="matches no"):
        PairShards(str(tmp_path / "nothing-*.parquet"), image_size=16)


def test_datasets_save_to_disk_folder_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = pickapic_rows(30)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(tmp_path / "one", max_shard_size="2KB")  # several arrow shards
    assert len(list((tmp_path / "one").glob("*.arrow"))) > 1
    stream = PairShards(tmp_path / "one", image_size=8, tie_policy="keep")
    assert len(stream) == 30
    assert {stream[i]["prompt"] for i in range(30)} == {r["caption"] for r in rows}
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"DatasetDict folder with splits \['train', 'validation'\]"):
        PairShards(tmp_path / "dict", image_size=8)
    assert len(PairShards(tmp_path / "dict" / "train", image_size=8, tie_policy="drop")) == 20


def test_processes_read_disjoint_row_groups_and_run_equal_batches(tmp_path):
    write_shards(tmp_path, pickapic_rows(90), n_shards=3, row_group=7)
    ds = PairShards(tmp_path, image_size=8, tie_policy="keep")
    sampler = PairShardSampler(ds, batch_size=4, seed=1, world=2, shuffle_blocks=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 * sampler.batches_per_process()
    per_process = [sum(batches[p::2], []) for p in range(2)]  # how accelerate deals them out
    assert len(per_process[0]) == len(per_process[1]) == 45
    blocks = [set(ds.block_of[idx].tolist()) for idx in per_process]
    assert not blocks[0] & blocks[1]  # each row group is read by one process only
    assert blocks[0] | blocks[1] == set(range(len(ds.reader.blocks)))
    again = list(PairShardSampler(ds, batch_size=4, seed=1, world=2, shuffle_blocks=2))
    assert again == batches  # (seed, epoch) fixes the order: exact resume
    sampler.epoch = 1
    assert list(sampler) != batches
    single = sum(PairShardSampler(ds, batch_size=4, seed=0).__iter__(), [])
    assert sorted(single) == list(range(90))  # one process: every pair once per epoch


@pytest.mark.parametrize("where", ["bytes", "files"])
def test_same_image_pairs_are_bad_rows(tmp_path, where, caplog):
    rng = np.random.default_rng(0)
    a, b = encoded_image(rng), encoded_image(rng)
    if where == "bytes":
        df = pd.DataFrame({"caption": ["ok", "same"], "jpg_0": [a, b], "jpg_1": [b, b],
                           "label_0": [1.0, 1.0], "label_1": [0.0, 0.0]})
    else:
        for name, data in {"a.png": a, "b.png": b, "b_copy.png": b}.items():
            (tmp_path / name).write_bytes(data)
        df = pd.DataFrame({"prompt": ["ok", "same file", "same bytes"],
                           "pos_path": ["a.png", "b.png", "b.png"],
                           "neg_path": ["b.png", "./b.png", "b_copy.png"]})
    path = tmp_path / "pairs.parquet"
    df.to_parquet(path)
    with pytest.raises(DataError, match="row 1: both sides of the pair are the same image"):
        load_pairs(path)
    with caplog.at_level(logging.WARNING):
        assert [r.prompt for r in load_pairs(path, on_bad_row="skip")] == ["ok"]
    assert f"skipped {len(df) - 1} bad row(s)" in caplog.text
    stream = PairShards(path, image_size=8, on_bad_row="skip")
    batch = collate_pairs([stream[i] for i in range(len(stream))])
    assert batch["prompt"] == ["ok"] and batch["n_bad"] == len(df) - 1
    with pytest.raises(DataError, match=r"pairs.parquet, row 1: both sides.*on_bad_row=skip"):
        PairShards(path, image_size=8)[1]


def test_streamed_bad_row_names_its_shard_and_row(tmp_path):
    rows = pickapic_rows(30)
    rows[2 * 3 + 2]["jpg_1"] = b"not an image"  # shard 2 (rows 2, 5, 8, ...), row 2 of that file
    paths = write_shards(tmp_path, rows)
    ds = PairShards(tmp_path, image_size=8, tie_policy="keep")
    bad = next(i for i in range(len(ds)) if ds.reader.where(int(ds.block_of[i]), int(ds.row_of[i]))[:2]
               == (str(paths[2]), 2))
    with pytest.raises(DataError, match=rf"{paths[2].name}, row 2: image <bytes> is corrupt"):
        ds[bad]
    loader = torch.utils.data.DataLoader(
        PairShards(tmp_path, image_size=8, tie_policy="keep", on_bad_row="skip"),
        batch_sampler=PairShardSampler(ds, 8), collate_fn=collate_pairs, num_workers=2)
    batches = list(loader)
    assert sum(b["n_bad"] for b in batches) == 1 and sum(len(b["prompt"]) for b in batches) == 29


def test_check_pairs_writes_a_report_and_a_clean_copy(tmp_path, colour_pairs):
    rows = pickapic_rows(24)
    rows[4]["jpg_0"] = rows[4]["jpg_0"][:40]  # truncated
    rows[9]["caption"] = " "
    rows[13]["jpg_1"] = rows[13]["jpg_0"]
    write_shards(tmp_path / "src", rows, n_shards=2, row_group=5)
    from reward.cli import check_main

    out = tmp_path / "clean" / "train.parquet"
    assert check_main([str(tmp_path / "src"), "--output-file", str(out), "--num-workers", "2"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert (report["rows"], report["bad_rows"], report["good_rows"]) == (24, 3, 21)
    reasons = {(Path(p["file"]).name[:11], p["row"]): p["reason"] for p in report["problems"]}
    assert "corrupt or truncated" in reasons[("train-00000", 2)]  # row 4 = shard 0, row 2
    assert "empty or missing caption" in reasons[("train-00001", 4)]  # row 9 = shard 1, row 4
    assert "same image" in reasons[("train-00001", 6)]  # row 13 = shard 1, row 6
    assert len(load_pairs(out, tie_policy="keep")) == 21  # the clean copy loads with no error
    # no temp left
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.parquet", "train.report.json"]
    # Relative image paths become absolute, so the clean copy works from its own folder.
    clean_social = tmp_path / "elsewhere" / "social.parquet"
    assert check_main([str(colour_pairs["val"]), "--output-file", str(clean_social)]) == 0
    first = pd.read_parquet(clean_social).iloc[0]
    assert Path(first["pos_path"]).is_absolute() and Path(first["pos_path"]).is_file()
    assert check_main([str(tmp_path / "src"), "--output-file", str(tmp_path / "x.csv")]) == 2


RSS_PROBE = r"""
import json, sys, torch
from reward.data import PairShards, PairShardSampler, collate_pairs
torch.set_num_threads(1)

def epoch(source):
    ds = PairShards(source, image_size=64, tie_policy="keep")
    loader = torch.utils.data.DataLoader(ds, batch_sampler=PairShardSampler(ds, 32), collate_fn=collate_pairs)
    return sum(len(b["prompt"]) for b in loader)

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

epoch(sys.argv[1])  # warm-up on a separate small set: libraries, pools and threads initialised
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
n = epoch(sys.argv[2])
print(json.dumps({"pairs": n, "base_kb": base, "peak_kb": status("VmHWM")}))
"""


def _heavy_shards(root: Path, n_rows: int, n_shards: int) -> int:
    """Rows of 2 encoded 64 px noise images (12 KB each; 40 distinct images reused across rows), stored
    uncompressed and without dictionary so the shards really hold the bytes; returns their size.
    BMP, because it decodes in a third of PNG's time: this test is about memory, not codecs."""
    rng = np.random.default_rng(0)
    pool = [encoded_image(rng, size=64, fmt="BMP") for _ in range(40)]
    root.mkdir(parents=True)
    for k in range(n_shards):
        idx = np.arange(k, n_rows, n_shards)
        table = pa.table({"caption": [f"prompt {i}" for i in idx], "jpg_0": [pool[i % 40] for i in idx],
                          "jpg_1": [pool[(i + 1) % 40] for i in idx], "label_0": np.ones(len(idx)),
                          "label_1": np.zeros(len(idx))})
        pq.write_table(table, root / f"train-{k:05d}-of-{n_shards:05d}.parquet", row_group_size=64,
                       compression="none", use_dictionary=False)
    return sum(p.stat().st_size for p in root.glob("*.parquet"))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="needs Linux /proc to reset the RSS peak")
def test_streaming_an_epoch_keeps_memory_far_below_the_shards(tmp_path):
    n_rows = 20_000
    shard_bytes = _heavy_shards(tmp_path / "big", n_rows, n_shards=4)
    # The warm-up set has the same row-group layout, so allocator pools reach their working size on it.
    _heavy_shards(tmp_path / "warm", 1_500, n_shards=1)
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "warm"), str(tmp_path / "big")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = (out["peak_kb"] - out["base_kb"]) * 1024
    assert out["pairs"] == n_rows
    assert shard_bytes > 450e6
    # The epoch reads every byte of the shards (index included); its peak RSS grows by under a
    # twelfth of them (the sampler mixes 4 row groups of 1.6 MB; the dataset caches as many). Measured
    # growth is 20-27 MB of 495 MB, varying with allocator timing; loading the shards whole would be 495 MB.
    assert growth < shard_bytes / 12, (growth, shard_bytes)
