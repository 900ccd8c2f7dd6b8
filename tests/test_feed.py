"""social-refl-feed: a model's images for prompts x seeds x guidance scales, each drawn as the stock pipeline
draws it alone, with a manifest the feedback readers take once likes or remixes are attached."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.lora import randomise_lora_b
from helpers.training import PROMPTS

from refl.cli import feed_main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory):
    from refl.components import load_components
    from refl.lora import LoraConfig, add_lora, save_lora

    components = load_components(str(base_dir))
    add_lora(components, LoraConfig(rank=4, alpha=4.0))
    randomise_lora_b(components)
    return save_lora(components, tmp_path_factory.mktemp("feed_lora") / "lora")


def test_a_feed_draws_every_image_as_the_stock_pipeline_would_alone(base_dir, lora_dir, tmp_path, capsys):
    from PIL import Image

    from refl.feed import SEED_STRIDE, read_feed
    from refl.generate import load_pipeline
    from refl.sampling import sample

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "feed"
    args = ["--model", str(base_dir), "--lora", str(lora_dir), "--prompts-file",
            str(tmp_path / "prompts.txt"), "--guidance-scales", "1.0", "3.0", "--n-seeds", "2", "--seed", "7",
            "--num-inference-steps", "3", "--scheduler", "ddim", "--batch-size", "3", "--out", str(out)]
    assert feed_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8
    manifest = pd.read_parquet(out / "feed.parquet")
    assert list(manifest.columns[:4]) == ["prompt", "image", "seed", "guidance_scale"]
    assert set(manifest["lora"]) == {str(lora_dir)} and set(manifest["model"]) == {str(base_dir)}
    # Per prompt: the guidance scales in order, once per seed round; seed + 100003 x prompt + image.
    assert manifest["guidance_scale"].tolist() == [1.0, 3.0, 1.0, 3.0] * 2
    assert manifest["seed"].tolist() == [7 + SEED_STRIDE * p + q for p in range(2) for q in range(4)]
    assert manifest["image"].tolist()[:2] == ["images/0000_000.png", "images/0000_001.png"]
    pipe = load_pipeline(str(base_dir), str(lora_dir), scheduler="ddim")
    for row in read_feed(out).itertuples():  # each image drawn alone: the batch did not matter
        alone = sample(pipe, [row.prompt], seeds=[row.seed], num_inference_steps=3,
                       guidance_scale=row.guidance_scale)[0]  # (H, W, 3)
        assert np.array_equal(np.asarray(Image.open(row.image).convert("RGB")), alone), row.image
    assert "guidance_scales" in (out / "config.yaml").read_text()
    # A folder holding a feed is not drawn over unless asked.
    assert feed_main(args) == 2
    assert "holds an earlier feed" in capsys.readouterr().err
    assert feed_main(args + ["--overwrite"]) == 0


def test_feedback_attaches_to_a_feed_without_moving_an_image(base_dir, tmp_path):
    from refl.feed import MANIFEST, write_feed
    from refl.generate import load_pipeline
    from reward.data import LabelShards, PairShards

    # bf16 drawing: the weights and activations in bf16 on CPU.
    pipe = load_pipeline(str(base_dir), scheduler="ddim", mixed_precision="bf16")
    manifest = write_feed(pipe, PROMPTS[:2], tmp_path / "feed", [2.0, 4.0], num_inference_steps=2,
                          drawn_by={"model": str(base_dir)})
    assert len(manifest) == 4 and (tmp_path / "feed" / MANIFEST).is_file()
    liked = manifest.assign(label=[1, 0, 0, 1])  # likes: the manifest with a label column
    liked.to_parquet(tmp_path / "feed" / "likes.parquet")
    labels = LabelShards(tmp_path / "feed" / "likes.parquet", 16)
    assert len(labels) == 4 and labels.labels.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert labels[0]["image"].shape == (3, 16, 16)
    images = manifest.groupby("prompt", sort=False)["image"].apply(list)
    pairs = pd.DataFrame([{"prompt": p, "pos_path": imgs[0], "neg_path": imgs[1]}
                          for p, imgs in images.items()])
    pairs.to_parquet(tmp_path / "feed" / "pairs.parquet")  # remixes: a pairs file in the feed's folder
    assert len(PairShards(tmp_path / "feed" / "pairs.parquet", 16)) == 2


def test_a_feed_refuses_what_it_cannot_draw(base_dir, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red square\n")
    common = ["--model", str(base_dir), "--prompts-file", str(tmp_path / "prompts.txt"), "--out",
              str(tmp_path / "feed")]
    assert feed_main(common + ["--lora", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert feed_main(common + ["--set", "guidance_scales=[]"]) == 2
    assert "guidance_scales is empty" in capsys.readouterr().err
    assert not (tmp_path / "feed").exists()
