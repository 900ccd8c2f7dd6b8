import io
import logging

import pandas as pd
import pytest
import torch
from PIL import Image

from reward.data import DataError, PairDataset, collate_pairs, load_pairs, split_by_prompt


def _png(path, colour=(200, 30, 30), size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def social(tmp_path):
    # Distinct images: a pair whose sides are the same image is a bad row.
    for i, name in enumerate(("a", "b", "c", "d")):
        _png(tmp_path / "imgs" / f"{name}.png", colour=(200, 30 + 40 * i, 30))
    df = pd.DataFrame({"prompt": ["a cat", "a dog"], "pos_path": ["imgs/a.png", "imgs/c.png"],
                       "neg_path": ["imgs/b.png", "imgs/d.png"]})
    path = tmp_path / "pairs.parquet"
    df.to_parquet(path)
    return path


def test_social_parquet_resolves_relative_paths(social):
    records = load_pairs(social)
    assert [r.prompt for r in records] == ["a cat", "a dog"]
    assert records[0].pos == str(social.parent.resolve() / "imgs" / "a.png")
    batch = collate_pairs([PairDataset(records, 16)[i] for i in range(2)])
    assert batch["pos"].shape == (2, 3, 16, 16) and batch["pos"].max() <= 1.0
    assert torch.allclose(batch["pos"][0, 0], torch.full((16, 16), 200 / 255), atol=1e-6)


def test_pickapic_ties_follow_the_policy():
    df = pd.DataFrame({
        "caption": ["red", "blue", "tie"],
        "jpg_0": [_png_bytes((255, 0, 0)), _png_bytes((0, 0, 50)), _png_bytes((1, 1, 1))],
        "jpg_1": [_png_bytes((50, 0, 0)), _png_bytes((0, 0, 255)), _png_bytes((2, 2, 2))],
        "label_0": [1.0, 0.0, 0.5], "label_1": [0.0, 1.0, 0.5],
    })
    keep = load_pairs(df, tie_policy="keep")
    assert [r.label for r in keep] == [1.0, 1.0, 0.5]
    # label_1 = 1 -> jpg_1 is the preferred image
    assert keep[1].pos == df.jpg_1[1]
    assert len(load_pairs(df, tie_policy="drop")) == 2
    half = load_pairs(df, tie_policy="half")
    assert (half[2].label, half[2].weight) == (1.0, 0.5)
    assert len(load_pairs(df, tie_policy="auto", loss_handles_ties=True)) == 3
    assert len(load_pairs(df, tie_policy="auto", loss_handles_ties=False)) == 2


def test_ranked_lists_expand_to_pairs(tmp_path):
    for i, n in enumerate("abc"):
        _png(tmp_path / f"{n}.png", colour=(10 * i, 0, 0))
    df = pd.DataFrame({"prompt": ["p"], "image_path": [["a.png", "b.png", "c.png"]], "rank": [[2, 1, 2]]})
    path = tmp_path / "ranked.jsonl"
    df.to_json(path, orient="records", lines=True)
    records = load_pairs(path, tie_policy="keep")
    pairs = {(r.pos.split("/")[-1], r.neg.split("/")[-1], r.label) for r in records}
    assert pairs == {("b.png", "a.png", 1.0), ("a.png", "c.png", 0.5), ("b.png", "c.png", 1.0)}


def test_missing_column_names_file_and_fix(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt": ["x"], "pos_path": ["a.png"]}).to_parquet(path)
    with pytest.raises(DataError, match="cannot tell the data format") as err:
        load_pairs(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError, match=r"missing column\(s\) \['neg_path'\]"):
        load_pairs(path, fmt="social")


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated", "empty_prompt"])
def test_bad_rows_are_named(social, problem):
    df = pd.read_parquet(social)
    root = social.parent
    if problem == "missing":
        df.loc[1, "neg_path"] = "imgs/nowhere.png"
        expect = "nowhere.png does not exist"
    elif problem == "corrupt":
        (root / "imgs" / "d.png").write_bytes(b"not a png at all")
        expect = "corrupt or truncated"
    elif problem == "truncated":
        data = (root / "imgs" / "d.png").read_bytes()
        big = root / "imgs" / "big.jpg"
        Image.effect_noise((64, 64), 50).convert("RGB").save(big, quality=95)
        big.write_bytes(big.read_bytes()[: len(big.read_bytes()) // 2])
        df.loc[1, "neg_path"] = "imgs/big.jpg"
        assert data
        expect = "corrupt or truncated"
    else:
        df.loc[1, "prompt"] = "   "
        expect = "empty or missing prompt"
    df.to_parquet(social)
    with pytest.raises(DataError, match=expect) as err:
        load_pairs(social)
    assert "row 1" in str(err.value) and str(social) in str(err.value) and "on_bad_row=skip" in str(err.value)


def test_skip_logs_count_and_rows(social, caplog):
    df = pd.read_parquet(social)
    df.loc[0, "pos_path"] = "imgs/gone.png"
    df.to_parquet(social)
    with caplog.at_level(logging.WARNING):
        records = load_pairs(social, on_bad_row="skip")
    assert [r.prompt for r in records] == ["a dog"]
    assert "skipped 1 bad row(s) of 2" in caplog.text and "row 0" in caplog.text


def test_file_without_any_valid_pair(social):
    df = pd.read_parquet(social)
    df["pos_path"] = "imgs/gone.png"
    df.to_parquet(social)
    with pytest.raises(DataError, match="no valid preference pair"):
        load_pairs(social, on_bad_row="skip")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "nope.parquet")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(tmp_path / "x.txt")


def test_split_by_prompt_keeps_prompts_whole(colour_pairs):
    records = load_pairs(colour_pairs["train"])
    train, val = split_by_prompt(records, 0.25)
    assert not {r.prompt for r in train} & {r.prompt for r in val}
    assert len(train) + len(val) == len(records) and val
