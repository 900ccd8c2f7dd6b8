"""Bad input: a clear error before the work, or a counted skip; never a late crash or a silent guess.

Images in every mode PIL opens decode to their real values (or are refused as bad rows); labels of every
layout are checked from the cheap columns before training; an empty or undecodable held-out split does
not cost the run; a typo in a `validate_reward` baseline stops before any scoring.
"""

import io
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

import reward
from reward.config import RewardConfig
from reward.data import DataError, PairDataset, PairShards, check_pairs, collate_pairs, load_pairs
from reward.train import train
from runkit.config import load_config


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb_png(colour=(10, 20, 30), size=2) -> bytes:
    return _encode(Image.new("RGB", (size, size), colour), "PNG")


def _pickapic(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_parquet(path)
    return path


def _row(caption, jpg_0, jpg_1=None, label_0=1.0, label_1=0.0):
    return {"caption": caption, "jpg_0": jpg_0, "jpg_1": jpg_1 if jpg_1 is not None else _rgb_png(),
            "label_0": label_0, "label_1": label_1}


def _alpha_over_white(rgba) -> list[int]:
    *rgb, a = rgba
    return [int(np.rint(c * a / 255 + 255 * (1 - a / 255))) for c in rgb]


def _mode_images():
    """(mode, encoded 2x2 image, expected RGB pixels in row-major order)."""
    grey16 = Image.fromarray(np.array([[0, 25700], [32768, 65535]], dtype=np.uint16))
    floats = Image.fromarray(np.array([[0.0, 0.2], [0.6, 1.0]], dtype=np.float32))
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    palette.putdata([0, 1, 2, 3])
    rgba_px = [(255, 0, 0, 128), (0, 0, 255, 255), (10, 20, 30, 0), (0, 0, 0, 255)]
    rgba = Image.new("RGBA", (2, 2))
    rgba.putdata(rgba_px)
    la_px = [(100, 128), (0, 255), (200, 0), (255, 255)]
    la = Image.new("LA", (2, 2))
    la.putdata(la_px)
    cmyk = Image.new("CMYK", (2, 2))
    cmyk.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 0), (0, 255, 0, 0)])
    bilevel = Image.new("1", (2, 2))
    bilevel.putdata([0, 1, 1, 0])
    grey = lambda vals: [[v] * 3 for v in vals]  # noqa: E731
    return [
        ("I;16", _encode(grey16, "PNG"), grey([0, 100, 128, 255])),  # by bit depth: x 255 / 65535
        ("F", _encode(floats, "TIFF"), grey([0, 51, 153, 255])),  # [0, 1] floats
        ("P", _encode(palette, "PNG", transparency=3),
         [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]),
        ("RGBA", _encode(rgba, "PNG"), [_alpha_over_white(p) for p in rgba_px]),
        ("LA", _encode(la, "PNG"), grey([_alpha_over_white((v, v, v, a))[0] for v, a in la_px])),
        ("CMYK", _encode(cmyk, "TIFF"), [[0, 255, 255], [0, 0, 0], [255, 255, 255], [255, 0, 255]]),
        ("1", _encode(bilevel, "PNG"), grey([0, 255, 255, 0])),
    ]


@pytest.mark.parametrize("mode,data,expected", _mode_images(), ids=[m for m, _, _ in _mode_images()])
def test_every_image_mode_decodes_to_its_real_values(tmp_path, mode, data, expected):
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == mode  # the test really feeds this mode
    path = _pickapic(tmp_path / "pairs.parquet", [_row("a picture", data)])
    want = torch.tensor(expected, dtype=torch.float32).view(2, 2, 3).permute(2, 0, 1) / 255  # (3, 2, 2)
    streamed = PairShards(path, image_size=2)[0]["pos"]  # the training path
    in_memory = PairDataset(load_pairs(path), 2)[0]["pos"]  # the in-memory (validation) path
    assert torch.allclose(streamed, want, atol=1e-6), (streamed * 255).round()
    assert torch.allclose(in_memory, want, atol=1e-6), (in_memory * 255).round()


def test_scoring_and_inference_decode_like_training(tmp_path):
    """The critic's own file scoring and the standard models' own-size path read a 16-bit PNG as training
    does."""
    from reward.evaluate import _image_at_own_size
    from reward.images import decode_image
    from reward.model import load_image_tensor

    mode, data, expected = _mode_images()[0]
    (tmp_path / "grey16.png").write_bytes(data)
    want = torch.tensor(expected, dtype=torch.float32).view(2, 2, 3).permute(2, 0, 1) / 255  # (3, 2, 2)
    assert torch.allclose(load_image_tensor(str(tmp_path / "grey16.png"), 2), want, atol=1e-6)
    assert torch.allclose(_image_at_own_size(data), want, atol=1e-6)
    with Image.open(tmp_path / "grey16.png") as im:  # a PIL image handed in by a caller
        assert np.array_equal(np.asarray(decode_image(im)), np.asarray(decode_image(data)))


def test_other_modes_decode_or_are_refused_with_the_reason():
    from reward.images import ImageError, decode_image

    lab = Image.new("LAB", (2, 2), (255, 128, 128))  # L* = 100, a* = b* = 0: white
    assert np.abs(np.asarray(decode_image(_encode(lab, "TIFF"))).astype(int) - 255).max() <= 2
    keyed = Image.new("RGB", (2, 2), (0, 255, 0))  # an RGB PNG whose tRNS chunk makes pure green transparent
    keyed.putpixel((0, 0), (9, 9, 9))
    out = np.asarray(decode_image(_encode(keyed, "PNG", transparency=(0, 255, 0))))
    assert out[0, 0].tolist() == [9, 9, 9] and out[1, 1].tolist() == [255, 255, 255]
    big_endian = Image.frombytes("I;16B", (2, 1), np.array([0, 65535], dtype=">u2").tobytes())
    assert np.asarray(decode_image(big_endian))[0, :, 0].tolist() == [0, 255]
    with pytest.raises(ImageError, match="mode La"):
        decode_image(Image.new("La", (2, 2)))
    with pytest.raises(ImageError, match="image is missing"):
        decode_image({"bytes": None, "path": None})
    with pytest.raises(FileNotFoundError, match="nowhere.png does not exist"):
        decode_image("nowhere.png")


def _refused_images():
    wide = Image.fromarray(np.array([[0, 70000], [-5, 100]], dtype=np.int32))  # 32-bit: no known bit depth
    hdr = Image.fromarray(np.array([[0.0, 3.5], [0.5, 1.0]], dtype=np.float32))  # floats outside [0, 1]
    return [("I", _encode(wide, "TIFF")), ("F", _encode(hdr, "TIFF"))]


@pytest.mark.parametrize("mode,data", _refused_images(), ids=["I-32bit", "F-outside-0-1"])
def test_an_image_without_a_known_range_is_a_bad_row_with_its_reason(tmp_path, mode, data):
    path = _pickapic(tmp_path / "pairs.parquet", [_row("good", _rgb_png((1, 2, 3))), _row("bad", data)])
    result = check_pairs(path, tmp_path / "clean.parquet")
    assert (result["rows"], result["bad_rows"]) == (2, 1)
    assert result["problems"][0]["row"] == 1 and f"mode {mode}" in result["problems"][0]["reason"]
    with pytest.raises(DataError, match=rf"row 1: .*mode {mode}"):
        PairShards(path, image_size=2)[1]


def test_a_truncated_image_is_refused_even_when_a_library_allows_truncation(tmp_path, monkeypatch):
    noise = Image.effect_noise((64, 64), 50).convert("RGB")
    data = _encode(noise, "JPEG", quality=95)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # some libraries set this process-wide
    path = _pickapic(tmp_path / "pairs.parquet", [_row("cut", data[: len(data) // 2])])
    with pytest.raises(DataError, match="row 0: .*truncated"):
        PairShards(path, image_size=8)[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


# ----------------------------------------------------------------------------- labels, checked up front
BAD_PICKAPIC_LABELS = [(2.0, -1.0), (float("nan"), 0.0), (1.0, 1.0), (0.3, 0.3)]


def test_pickapic_labels_are_validated_before_any_image_is_read(tmp_path, caplog):
    rows = [_row("good", _rgb_png((1, 1, 1)))]
    rows += [_row(f"bad {i}", _rgb_png((i, 9, 9)), label_0=a,
                  label_1=b) for i, (a, b) in enumerate(BAD_PICKAPIC_LABELS)]
    path = _pickapic(tmp_path / "pairs.parquet", rows)
    with pytest.raises(DataError, match=r"pairs.parquet, row 1: label_0=2.0, label_1=-1.0.*on_bad_row=skip"):
        PairShards(path, image_size=2)  # at indexing, not when the row is reached mid-run
    with pytest.raises(DataError, match=r"row 1: label_0=2.0, label_1=-1.0"):
        load_pairs(path)
    with caplog.at_level(logging.WARNING):
        ds = PairShards(path, image_size=2, on_bad_row="skip")
    assert len(ds) == 1 and ds.n_bad_rows == len(BAD_PICKAPIC_LABELS)
    assert f"skipped {len(BAD_PICKAPIC_LABELS)} bad row(s)" in caplog.text
    assert [r.prompt for r in load_pairs(path, on_bad_row="skip")] == ["good"]


def test_training_on_impossible_labels_stops_before_the_first_update(tmp_path):
    rows = [_row(f"p {i}", _rgb_png((i, 0, 0)), _rgb_png((0, i, 1))) for i in range(8)]
    rows[5]["label_0"], rows[5]["label_1"] = 2.0, -1.0
    path = _pickapic(tmp_path / "pairs.parquet", rows)
    cfg = load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", f"data.train={path}", "data.val_fraction=0", "loss.name=pickscore",
        "train.batch_size=4", "train.max_updates=2", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"pairs.parquet, row 5: label_0=2.0, label_1=-1.0"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "critic").exists()


def _ranked_file(tmp_path, ranks, paths=None, suffix=".jsonl"):
    for i in range(3):
        Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    paths = paths if paths is not None else [["0.png", "1.png", "2.png"][: len(r)] for r in ranks]
    df = pd.DataFrame({"prompt": [f"p {i}" for i in range(len(ranks))], "image_path": paths, "rank": ranks})
    path = tmp_path / f"ranked{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


@pytest.mark.parametrize("ranks,reason", [
    ([[1, 2, 3], [1, None, 2]], "rank"),  # a missing rank: no order can be read
    ([[1, 2, 3], [1, 2]], "rank has 2"),  # with paths of 3 images below: lengths differ
    ([[1, 2, 3], [1]], "fewer than 2"),  # one image: no pair at all
])
def test_ranked_rows_with_unreadable_ranks_are_bad_rows(tmp_path, ranks, reason):
    paths = [["0.png", "1.png", "2.png"], ["0.png", "1.png", "2.png"] if len(ranks[1]) == 2 else
             ["0.png", "1.png", "2.png"][: len(ranks[1])]]
    path = _ranked_file(tmp_path, ranks, paths)
    with pytest.raises(DataError, match=rf"row 1: .*{reason}"):
        PairShards(path, image_size=4, tie_policy="keep")
    with pytest.raises(DataError, match=rf"row 1: .*{reason}"):
        load_pairs(path, tie_policy="keep")
    assert len(PairShards(path, image_size=4, tie_policy="keep", on_bad_row="skip")) == 3


def test_ranked_csv_with_lists_as_text_names_the_fix(tmp_path):
    path = _ranked_file(tmp_path, [[2, 1, 3]], suffix=".csv")
    assert isinstance(pd.read_csv(path)["rank"][0], str)  # CSV holds "[2, 1, 3]"
    with pytest.raises(DataError, match=r"row 0: .*(image_path|rank) is text.*parquet or jsonl"):
        load_pairs(path)


# ----------------------------------------------------------------------------- paths and cells
@pytest.mark.parametrize("cell,reason", [
    ("", "empty"), ("https://example.com/a.png", "URL"), ("imgs", "folder"), (None, "empty"),
])
def test_social_paths_that_name_no_image_file_are_bad_rows_with_their_reason(tmp_path, cell, reason):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (4, 4), (3, 2, 1)).save(tmp_path / "imgs" / "b.png")
    df = pd.DataFrame({"prompt": ["ok", "bad"], "pos_path": ["imgs/a.png", "imgs/a.png"],
                       "neg_path": ["imgs/b.png", cell]})
    path = tmp_path / "pairs.parquet"
    df.to_parquet(path)
    with pytest.raises(DataError, match=rf"row 1: .*neg_path.*{reason}"):
        PairShards(path, image_size=4)
    result = check_pairs(path, tmp_path / "clean.parquet")
    assert result["bad_rows"] == 1 and reason in result["problems"][0]["reason"]


def test_datasets_image_cells_without_bytes_read_their_path_beside_the_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    Image.new("RGB", (4, 4), (200, 0, 0)).save(tmp_path / "data" / "a.png")
    rows = [_row("by path", {"bytes": None, "path": "a.png"}), _row("nothing", {"bytes": None, "path": None})]
    path = _pickapic(tmp_path / "data" / "pairs.parquet", rows)
    monkeypatch.chdir(tmp_path)  # not the file's folder: the relative path must still resolve beside it
    ds = PairShards(path, image_size=4, on_bad_row="skip")
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["prompt"] == ["by path"] and batch["n_bad"] == 1
    assert torch.allclose(batch["pos"][0, 0], torch.full((4, 4), 200 / 255))
    assert "image is missing" in batch["bad"][0]


# -------------------------------------------------------------------------- held-out splits that hold nothing
def _cfg(colour_pairs, val, out, *extra):
    return load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", "model.training_mode=all", f"data.train={colour_pairs['train']}",
        f"data.val={val}", "train.batch_size=32", "train.lr=1e-3", f"train.output_dir={out}", *extra])


def _val_file(tmp_path, kind: str) -> Path:
    """A held-out pickapic set whose every row is bad: missing files (seen at start), corrupt bytes (seen
    only when decoded), or ties only (nothing to score)."""
    rows = []
    for i in range(6):
        if kind == "corrupt":
            rows.append(_row(f"v {i}", b"not an image", _rgb_png((i, 1, 1))))
        elif kind == "ties":
            rows.append(_row(f"v {i}", _rgb_png((i, 2, 2)), _rgb_png((2, i, 3)), 0.5, 0.5))
        else:
            rows.append(_row(f"v {i}", _rgb_png((i, 3, 3)), _rgb_png((3, i, 4)), label_0=-1.0))
    return _pickapic(tmp_path / f"val_{kind}.parquet", rows)


@pytest.mark.parametrize("kind", ["labels", "corrupt", "ties"])
def test_a_held_out_split_with_nothing_to_score_costs_validation_not_the_run(colour_pairs, tmp_path, kind,
                                                                            caplog):
    val = _val_file(tmp_path, kind)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        result = train(_cfg(colour_pairs, val, out, "data.on_bad_row=skip", "train.max_updates=2",
                            "train.validate_every=1"))
    assert result["update"] == 2 and result["eval"] is None
    assert (out / "critic" / "critic.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["eval"] is None
    assert "without validation" in caplog.text


def test_scoring_a_set_with_no_scorable_pair_is_a_clear_result(tmp_path):
    from reward.evaluate import evaluate_pairs, score_pairs
    from reward.model import CriticConfig, create_critic

    critic = create_critic(CriticConfig(model_name="tiny-clip"))
    ds = PairShards(_val_file(tmp_path, "corrupt"), critic.image_size, on_bad_row="skip")
    s_pos, s_neg = score_pairs(critic, ds)
    assert s_pos.shape == s_neg.shape == (0,)
    with pytest.raises(DataError, match="no pair could be scored"):
        evaluate_pairs(critic, ds)


def test_a_checkpoint_due_at_an_update_is_written_before_its_validation(colour_pairs, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(colour_pairs, _val_file(tmp_path, "corrupt"), out, "train.max_updates=3",
               "train.validate_every=1", "train.checkpoint_every=1")
    with pytest.raises(DataError, match="is corrupt"):
        train(cfg)  # on_bad_row=error: the first validation meets the corrupt images
    assert (out / "checkpoints" / "update-000001").is_dir()
    assert not (out / "critic").exists()  # not the end of training: no final critic


def test_a_crash_in_the_final_validation_leaves_the_checkpoint_and_the_critic(colour_pairs, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(colour_pairs, _val_file(tmp_path, "corrupt"), out, "train.max_updates=2",
               "train.validate_every=100", "train.checkpoint_every=100")
    with pytest.raises(DataError, match="is corrupt"):
        train(cfg)
    assert (out / "checkpoints" / "update-000002").is_dir()
    critic = reward.load(out / "critic")  # the trained critic, uncalibrated
    assert critic.score_scale.item() == 1.0


# --------------------------------------------------------------------------- models named on the command line
@pytest.fixture
def tiny_critic_and_pairs(tmp_path):
    from reward.model import CriticConfig, create_critic

    create_critic(CriticConfig(model_name="tiny-clip",
                               training_mode="all")).save_pretrained(tmp_path / "critic")
    rows = [_row(f"p {i}", _rgb_png((i, 0, 0), 8), _rgb_png((0, i, 1), 8)) for i in range(4)]
    return tmp_path / "critic", _pickapic(tmp_path / "pairs.parquet", rows)


@pytest.mark.parametrize("spec,names", [
    ("hpsv3:weights/HPS_v2_compressed.pt", ["hpsv3", "hpsv2"]),  # unknown kind
    ("ViT-L-14-quickgelu:opneai", ["opneai", "openai"]),  # unknown pretrained tag
    ("ViT-Q-99", ["ViT-Q-99", "open_clip"]),  # unknown open_clip model
    ("aesthetic", ["aesthetic:PATH", "sac+logos"]),  # weights no hub repository hosts, and none named
    ("clip:ViT-Q-99", ["ViT-Q-99", "open_clip"]),  # the evaluator spelling reaches the same check
    ("hpsv2:{tmp}/missing/HPS_v2_compressed.pt", ["missing"]),  # a standard kind's missing weights file
    ("clipscore:tiny-clip:{tmp}/nope.pt", ["nope.pt"]),  # a missing open_clip weights file
])
def test_validate_reward_refuses_a_bad_baseline_before_scoring(tiny_critic_and_pairs, tmp_path, monkeypatch,
                                                               capsys, spec, names):
    import reward.evaluate
    from reward.cli import validate_main

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored pairs before every baseline was resolved")

    monkeypatch.setattr(reward.evaluate, "evaluate_pairs", must_not_score)
    critic, pairs = tiny_critic_and_pairs
    spec = spec.format(tmp=tmp_path)
    out = tmp_path / "v.json"
    assert validate_main([str(pairs), "--critic", str(critic), "--output-file", str(out), "--baselines",
                          spec]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and spec.removeprefix("clip:") in err[0] and all(n in err[0] for n in names), err
    assert not out.exists()


def test_open_clip_weights_missing_from_an_offline_cache_stop_training_with_the_fix(tmp_path, monkeypatch,
                                                                                   capsys, caplog):
    """A known tag whose weights are not in the hub cache, offline: one line naming the weights, saying
    HF_HUB_OFFLINE is why, and where a local file goes; nothing trained, no traceback."""
    import huggingface_hub.constants

    from reward.cli import train_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    assert train_main(["--set", "model.model_name=ViT-B-32", "--set", "model.pretrained=openai",
                       "--set", f"train.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "ViT-B-32:openai" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert "model.pretrained" in lines[0]
    # open_clip's own log line says it again, without the fix: dropped
    assert not [r for r in caplog.records if "Failed to download weights" in r.getMessage()]
    assert not (out / "checkpoints").exists()


def test_a_held_out_set_that_is_the_training_set_is_pointed_out(colour_pairs, tmp_path, caplog):
    cfg = load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", f"data.train={colour_pairs['train']}",
        f"data.val={colour_pairs['train']}", "train.max_updates=1", "train.batch_size=8",
        f"train.output_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING, logger="reward.train"):
        train(cfg)
    said = [r.getMessage() for r in caplog.records if "shares 1 file(s) with data.train" in r.getMessage()]
    assert len(said) == 1 and "not how it generalises" in said[0]


def test_validate_reward_takes_baselines_spelled_as_evaluator_specs(tiny_critic_and_pairs, tmp_path):
    """clip:NAME and critic:DIR, as compare.py and train.heldout_evaluators spell them, were refused here."""
    from reward.cli import validate_main

    critic, pairs = tiny_critic_and_pairs
    out = tmp_path / "v.json"
    assert validate_main([str(pairs), "--critic", f"critic:{critic}", "--output-file", str(out),
                          "--baselines", "clip:tiny-clip", "--baselines", f"critic:{critic}"]) == 0
    report = json.loads(out.read_text())
    # the critic folder beside the report is named relative to it (bad input 3: no absolute path stored)
    assert [b["model"] for b in report["baselines"]] == ["tiny-clip", "critic"]
    assert report["baselines"][1]["pairwise_accuracy"] == report["tuned"]["pairwise_accuracy"]
    assert validate_main([str(pairs), "--critic", str(critic), "--baselines", "none"]) == 0
    stored = (critic / "validation.json").read_text()  # by default inside the critic's folder
    assert json.loads(stored)["critic"] == "." and str(critic) not in stored


def test_a_missing_critic_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"critic folder .*nowhere.* does not exist.*critic.json"):
        reward.load(tmp_path / "nowhere" / "critic")
    weights = tmp_path / "critic.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"is a file.*folder"):
        reward.load(weights)


# ----------------------------------------------------------------------------- the checking command
def test_csv_missing_a_column_stops_the_checking_command(tmp_path, capsys):
    from reward.cli import check_main

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,pos_path\na cat,a.png\n")
    assert check_main([str(path), "--output-file", str(tmp_path / "clean.parquet"), "--format",
                       "social"]) == 2
    err = capsys.readouterr().err
    assert "pairs.csv" in err and "missing column(s) ['neg_path']" in err


# ------------------------------------------------------------------- bad input 3: duplicated pairs
@pytest.fixture
def pairs_five_times(tmp_path):
    """29 distinct social pairs, and the same file with every row written five times."""
    from reward.synthetic import make_colour_pairs

    once = make_colour_pairs(tmp_path / "pairs", n_pairs=29, size=8, seed=3)
    five = tmp_path / "pairs" / "five.parquet"
    pd.concat([pd.read_parquet(once)] * 5, ignore_index=True).to_parquet(five)
    return once, five


def test_bad_input_3_duplicated_pairs_are_counted_and_dropped_before_the_interval(pairs_five_times, tmp_path,
                                                                                 caplog):
    """Every row five times: the in-memory reader, the streaming index and the checking pass count 116
    repeats and keep the 29 distinct pairs, so the held-out interval is that of the 29 (it narrowed to
    [0.23, 0.39] from [0.14, 0.48] before); duplicate_pairs=keep keeps all 145, still counted."""
    from reward.evaluate import evaluate_pairs
    from reward.model import CriticConfig, create_critic

    once, five = pairs_five_times
    with caplog.at_level(logging.WARNING):
        counts: dict = {}
        deduped = load_pairs(five, counts=counts)
    assert counts == {"bad_rows": 0, "duplicate_pairs": 116}
    assert "116 of 145 pair(s) repeat an earlier one" in caplog.text and "row 29 repeats row 0" in caplog.text
    assert [(r.prompt, r.pos, r.neg) for r in deduped] == [(r.prompt, r.pos, r.neg) for r in load_pairs(once)]
    critic = create_critic(CriticConfig(model_name="tiny-clip"))
    single = evaluate_pairs(critic, load_pairs(once))
    assert evaluate_pairs(critic, deduped)["ci95"] == single["ci95"]
    kept = load_pairs(five, duplicate_pairs="keep")
    assert len(kept) == 145 and evaluate_pairs(critic, kept)["n_pairs"] == 145

    streamed = PairShards(five, image_size=8)
    assert (len(streamed), streamed.n_duplicates) == (29, 116)
    assert (len(PairShards(five, image_size=8, duplicate_pairs="keep")), ) == (145, )
    assert evaluate_pairs(critic, streamed)["ci95"] == single["ci95"]

    report = check_pairs(five, tmp_path / "clean.parquet")
    assert (report["duplicate_pairs"], report["duplicate_rows"], report["clean_rows"]) == (116, 116, 29)
    assert len(pd.read_parquet(tmp_path / "clean.parquet")) == 29
    assert report["duplicates"][0] == {"file": str(five), "row": 29, "repeats": {"file": str(five), "row": 0}}
    kept_copy = check_pairs(five, tmp_path / "all.parquet", duplicate_pairs="keep")["clean"]
    assert len(pd.read_parquet(kept_copy)) == 145


def test_bad_input_3_a_repeated_pair_is_found_in_every_format(tmp_path):
    """One definition of a repeat (prompt, preferred image, rejected image, label) for every format:
    Pick-a-Pic rows listing the same pair in the other order, by bytes or by their image uids (then no image
    is read when indexing); ranked rows; labelled images. The same images with the opposite label are no
    repeat."""
    from reward.data import LabelShards

    a, b = _rgb_png((1, 2, 3)), _rgb_png((4, 5, 6))
    rows = [_row("p", a, b), _row("p", b, a, 0.0, 1.0), _row("p", a, b, 0.5, 0.5), _row("p", b, a, 0.5, 0.5),
            _row("p", b, a)]  # repeat, tie, its repeat, a different preference
    by_bytes = PairShards(_pickapic(tmp_path / "bytes.parquet", rows), image_size=4, tie_policy="keep")
    assert (len(by_bytes), by_bytes.n_duplicates) == (3, 2)
    uids = [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A"), ("B", "A")]
    with_uids = [{**r, "image_0_uid": u0, "image_1_uid": u1, "jpg_0": _rgb_png((i, 9, 9))}
                 for i, (r, (u0, u1)) in enumerate(zip(rows, uids))]  # bytes differ: the uids decide
    by_uid = PairShards(_pickapic(tmp_path / "uids.parquet", with_uids), image_size=4, tie_policy="keep")
    assert (len(by_uid), by_uid.n_duplicates) == (3, 2) and "jpg_0" not in by_uid._index_columns()
    assert len(load_pairs(tmp_path / "uids.parquet", tie_policy="keep")) == 3
    unnamed = [{**r, "image_0_uid": None} for r in with_uids[:2]]  # an empty uid: no bytes read to compare
    assert PairShards(_pickapic(tmp_path / "unnamed.parquet", unnamed), image_size=4).n_duplicates == 0

    for name in ("x.png", "y.png", "z.png"):
        Image.new("RGB", (4, 4), (len(name), 0, 0)).save(tmp_path / name)
    ranked = tmp_path / "ranked.parquet"
    pd.DataFrame([{"prompt": "r", "image_path": ["x.png", "y.png", "z.png"], "rank": [1, 2, 3]}] * 2
                 + [{"prompt": "r", "image_path": ["z.png", "x.png"], "rank": [2, 1]}]).to_parquet(ranked)
    ds = PairShards(ranked, image_size=4)
    assert (len(ds), ds.n_duplicates) == (3, 4)

    labelled = tmp_path / "labels.csv"
    pd.DataFrame({"prompt": ["q", "q", "q"], "image": ["x.png", "./x.png", "x.png"],
                  "label": [1, 1, 0]}).to_csv(labelled, index=False)
    ds = LabelShards(labelled, image_size=4)
    assert (len(ds), ds.n_duplicates) == (2, 1)


def test_bad_input_3_the_critic_trainer_reports_duplicated_pairs_in_its_metrics(colour_pairs, tmp_path,
                                                                                caplog):
    twice = tmp_path / "twice.parquet"
    frame = pd.read_parquet(colour_pairs["train"])
    base = Path(colour_pairs["train"]).parent
    frame[["pos_path", "neg_path"]] = frame[["pos_path", "neg_path"]].map(lambda p: str(base / p))
    pd.concat([frame, frame], ignore_index=True).to_parquet(twice)
    out = tmp_path / "run"
    cfg = load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", f"data.train={twice}", "data.val_fraction=0.25", "train.max_updates=1",
        "train.batch_size=8", f"train.output_dir={out}"])
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert json.loads((out / "metrics.json").read_text())["duplicate_pairs"] == 384  # train and held out
    assert "repeat an earlier one" in caplog.text and "data.duplicate_pairs=drop" in caplog.text


@pytest.mark.parametrize("where", ["held-out split, seen when indexing", "data.val, seen when decoding"])
def test_bad_input_3_bad_rows_skipped_counts_the_held_out_pairs(colour_pairs, tmp_path, where):
    """metrics.json said bad_rows_skipped: 0 when every skipped row was held out."""
    from reward.data import prompt_in_val

    out = tmp_path / "run"
    if where.startswith("held-out split"):
        frame = pd.read_parquet(colour_pairs["train"])
        base = Path(colour_pairs["train"]).parent
        frame[["pos_path", "neg_path"]] = frame[["pos_path", "neg_path"]].map(lambda p: str(base / p))
        held_out = frame.prompt.map(lambda p: prompt_in_val(p, 0.25))
        frame.loc[held_out, "neg_path"] = str(tmp_path / "missing.png")  # every held-out row, no other
        train_file = tmp_path / "pairs.parquet"
        frame.to_parquet(train_file)
        n_bad = int(held_out.sum())
        extra = [f"data.train={train_file}", "data.val_fraction=0.25"]
    else:
        bad = [_row(f"v {i}", b"not an image", _rgb_png((i, 1, 1))) for i in range(3)]
        good = [_row(f"w {i}", _rgb_png((i, 2, 2), 16), _rgb_png((2, i, 3), 16)) for i in range(3)]
        extra, n_bad = [f"data.val={_pickapic(tmp_path / 'val.parquet', bad + good)}"], 3
    cfg = load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", f"data.train={colour_pairs['train']}", "data.on_bad_row=skip",
        "train.max_updates=1", "train.batch_size=8", f"train.output_dir={out}", *extra])
    train(cfg)
    assert n_bad > 0 and json.loads((out / "metrics.json").read_text())["bad_rows_skipped"] == n_bad


# ------------------------------------------------- bad input 3, the new sweep: files of the wrong kind
@pytest.mark.parametrize("case", ["output file is a folder", "report file is a folder", "latin-1 csv"])
def test_bad_input_3_sweep_check_pairs_names_the_file_and_the_fix_before_any_work(colour_pairs, tmp_path,
                                                                                 capsys, case):
    """A folder for the clean copy or the report failed at the rename ('Is a directory: .clean.xyz'), the
    report's after the clean copy was written; a latin-1 csv got the codec's text."""
    from reward.cli import check_main

    source, out, extra = str(colour_pairs["train"]), tmp_path / "clean.parquet", []
    if case == "output file is a folder":
        out.mkdir()
        names = ["--output-file", "is a folder"]
    elif case == "report file is a folder":
        (tmp_path / "report").mkdir()
        extra, names = ["--report-file", str(tmp_path / "report")], ["--report-file", "is a folder"]
    else:
        text = "prompt,pos_path,neg_path\ncaf\xe9,a.png,b.png\n"
        (tmp_path / "latin1.csv").write_bytes(text.encode("latin-1"))
        source, names = str(tmp_path / "latin1.csv"), ["latin1.csv is not UTF-8 text", "save it as UTF-8"]
    assert check_main([source, "--output-file", str(out), *extra]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")][-1]
    assert all(n in line for n in names) and ".tmp" not in line, line
    assert case == "output file is a folder" or not out.exists()  # refused before the copy was written


def test_bad_input_3_sweep_validate_reward_refuses_a_report_folder_before_scoring(tiny_critic_and_pairs,
                                                                                  tmp_path, monkeypatch,
                                                                                  capsys):
    import reward.evaluate
    from reward.cli import validate_main

    def must_not_score(*args, **kwargs):
        raise AssertionError("scored pairs before the output file was checked")

    monkeypatch.setattr(reward.evaluate, "evaluate_pairs", must_not_score)
    critic, pairs = tiny_critic_and_pairs
    (tmp_path / "reports").mkdir()
    assert validate_main([str(pairs), "--critic", str(critic), "--output-file",
                          str(tmp_path / "reports")]) == 2
    assert "--output-file" in capsys.readouterr().err
