"""The toy world: grammar, renderer vs checker, oracle, community pairs, the shipped toy CLIP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from toyworld.checker import check, prompt_fidelity, read_image
from toyworld.community import BehaviourConfig, build_pairs, build_pairs_with_stats
from toyworld.datasets import render_dataset
from toyworld.oracle import TERMS, oracle_score, oracle_terms
from toyworld.render import Look, draw_look, render, render_candidates
from toyworld.world import (
    ANCHORS,
    ATTRIBUTES,
    COLOURS,
    Scene,
    all_scenes,
    parse_prompt,
    sample_scene,
    scene_to_prompt,
    split_prompts,
)

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "toyworld" / "assets" / "toy-clip"


def test_prompt_round_trip_and_rejects_other_text():
    scenes = all_scenes()
    assert len(scenes) > 1000
    assert all(parse_prompt(scene_to_prompt(s)) == s for s in scenes)
    rng = np.random.default_rng(0)
    assert parse_prompt(scene_to_prompt(sample_scene(rng)).upper()) in scenes  # case-insensitive
    with pytest.raises(ValueError, match="grammar"):
        parse_prompt("a photo of a dog")
    with pytest.raises(ValueError):
        parse_prompt("a large red hexagon in the center on a blue background")


def test_split_is_fixed_disjoint_and_covers_everything():
    train, held = split_prompts(seed=0)
    assert split_prompts(seed=0) == (train, held)
    assert split_prompts(seed=1)[1] != held
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(all_scenes())
    assert len(held) >= 96  # enough held-out prompts for evaluation


def test_each_held_out_use_is_a_disjoint_random_draw_that_grows_by_appending():
    from toyworld.world import HELDOUT_USES, heldout_prompts

    held = split_prompts(seed=0)[1]
    draws = {use: heldout_prompts(use, 32) for use in HELDOUT_USES}
    assert all(set(d) <= set(held) and len(set(d)) == 32 for d in draws.values())
    assert not set(draws["oracle_pairs"]) & set(draws["compare"])
    assert not set(draws["compare"]) & set(draws["validation"])
    assert not set(draws["oracle_pairs"]) & set(draws["validation"])
    # not an alphabetical slice: 16 comparison prompts span both sizes and most colours
    compare = heldout_prompts("compare", 16)
    assert compare == draws["compare"][:16] and compare != sorted(compare)
    assert {p.split()[1] for p in compare} == {"large", "small"} and len({p.split()[2] for p in compare}) >= 6
    with pytest.raises(ValueError, match="it has 50"):
        heldout_prompts("validation", 51)
    with pytest.raises(ValueError, match="unknown held-out use"):
        heldout_prompts("test", 1)


def test_prompts_fit_the_toy_clip_context():
    from reward.model import CriticConfig, create_critic

    critic = create_critic(CriticConfig(model_name="toy-clip", training_mode="all"))
    prompts = [scene_to_prompt(s) for s in all_scenes()]
    tokens = critic.tokenize(prompts)  # (P, 16)
    assert tokens.shape[1] == 16
    lengths = (tokens != 0).sum(1)  # start + words + end
    assert int(lengths.max()) <= 14
    eot = critic.tokenizer.eot_token_id
    assert bool((tokens.gather(1, (lengths - 1)[:, None]) == eot).all())  # nothing truncated


def test_renders_vary_and_are_reproducible():
    scene = Scene("circle", "red", "blue", "large", "left")
    a = np.asarray(render(scene, np.random.default_rng(0)))
    b = np.asarray(render(scene, np.random.default_rng(0)))
    c = np.asarray(render(scene, np.random.default_rng(1)))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
    images, prompts = render_dataset(16, seed=0, split="heldout")
    assert images.shape == (16, 32, 32, 3)
    assert set(prompts) <= set(split_prompts(0)[1])


def test_checker_agrees_with_renderer_on_300_renders():
    images, prompts = render_dataset(300, seed=123, split="all")
    per_attr = {a: [] for a in ATTRIBUTES}
    for img, prompt in zip(images, prompts):
        for attr, ok in check(img, prompt).items():
            per_attr[attr].append(ok)
    rates = {a: float(np.mean(v)) for a, v in per_attr.items()}
    assert all(rate >= 0.99 for rate in rates.values()), rates
    assert prompt_fidelity(images, prompts) >= 0.99


def test_checker_notices_wrong_prompts():
    images, prompts = render_dataset(60, seed=5, split="all")
    wrong = []
    for p in prompts:
        s = parse_prompt(p)
        other = next(c for c in COLOURS if c != s.colour and c != s.background)
        wrong.append(scene_to_prompt(replace(s, colour=other,
                                             shape="square" if s.shape != "square" else "circle")))
    assert prompt_fidelity(images, wrong) <= 0.05
    # Float images in [0, 1] read the same as uint8 ones.
    assert prompt_fidelity(images.astype(np.float32) / 255.0, prompts) >= 0.98


def _look(scene: Scene, **kw) -> Look:
    ax, ay = ANCHORS[scene.position]
    base = dict(cx=ax, cy=ay, extent=0.56, fg=(240.0, 20.0, 20.0), bg=(40.0, 60.0, 140.0), texture=1.0,
                blur=0.0)
    return Look(**{**base, **kw})


def test_oracle_prefers_vivid_centred_large_crisp_over_faded_offcentre_tiny_blurred():
    scene = Scene("circle", "red", "blue", "large", "center")
    rng = np.random.default_rng(0)
    good = draw_look(scene.shape, _look(scene), rng)
    bad = draw_look(scene.shape, _look(scene, cx=0.58, cy=0.43, extent=0.40, fg=(165.0, 95.0, 100.0),
                                      texture=14.0, blur=1.0), rng)
    prompt = scene_to_prompt(scene)
    terms = oracle_terms(np.stack([good, bad]), [prompt, prompt])  # each (2,)
    assert set(terms) == set(TERMS)
    for name in ("vivid", "placement", "size", "sharp", "clean"):
        assert terms[name][0] > terms[name][1], (name, terms[name])
    scores = oracle_score([good, bad], [prompt, prompt])
    assert scores[0] > scores[1] + 0.2
    assert np.all((scores >= 0) & (scores <= 1))


def test_oracle_punishes_the_wrong_colour():
    scene = Scene("square", "green", "white", "small", "top")
    rng = np.random.default_rng(1)
    right = draw_look("square", _look(scene, extent=0.28, fg=(40.0, 170.0, 60.0), bg=(240.0, 238.0, 230.0)),
                      rng)
    wrong = draw_look("square", _look(scene, extent=0.28, fg=(40.0, 80.0, 220.0), bg=(240.0, 238.0, 230.0)),
                      rng)
    prompt = scene_to_prompt(scene)
    terms = oracle_terms([right, wrong], [prompt, prompt])
    assert terms["fidelity"][0] == 1.0 and terms["fidelity"][1] < 1.0


def _small_world(seed: int = 0, n_prompts: int = 8, n: int = 6) -> dict:
    rng = np.random.default_rng(seed)
    prompts = split_prompts(0)[0][::50][:n_prompts]
    return {p: render_candidates(parse_prompt(p), rng, n) for p in prompts}


def test_community_pairs_are_reproducible_from_the_seed(tmp_path):
    world = _small_world()
    cfg = BehaviourConfig(prompts_per_user=4)
    a = build_pairs(world, n_users=12, seed=7, out_dir=tmp_path / "a", config=cfg)
    b = build_pairs(world, n_users=12, seed=7, out_dir=tmp_path / "b", config=cfg)
    c = build_pairs(world, n_users=12, seed=8, out_dir=tmp_path / "c", config=cfg)
    da, db, dc = (pd.read_parquet(p) for p in (a, b, c))
    assert list(da.columns) == ["prompt", "pos_path", "neg_path"]
    assert len(da) > 10
    pd.testing.assert_frame_equal(da, db)
    assert not da.equals(dc)
    assert (da.pos_path != da.neg_path).all()
    for rel in pd.concat([da.pos_path, da.neg_path]):
        assert not Path(rel).is_absolute() and (tmp_path / "a" / rel).is_file()
    text = (tmp_path / "a" / "pairs_summary.json").read_text()
    summary = json.loads(text)
    assert summary["n_pairs"] == len(da)
    # bad input 3: a copied pairs folder named the original's absolute path
    assert summary["parquet"] == "pairs.parquet" and str(tmp_path) not in text


def test_community_pairs_carry_the_taste_and_load_as_social_reward_data(tmp_path):
    from reward.data import load_pairs

    world = _small_world(seed=1, n_prompts=24, n=8)
    # Exposure as in make_toy_pairs (about 6 looks per prompt): denser exposure leaves only the worst
    # images un-remixed, which makes the pairs cleaner than implicit feedback is.
    result = build_pairs_with_stats(world, n_users=12, seed=0, out_dir=tmp_path)
    # Noisy like implicit feedback, but clearly better than a coin.
    assert 0.6 <= result.oracle_agreement <= 0.95, result.oracle_agreement
    records = load_pairs(result.parquet)
    assert len(records) == result.n_pairs
    assert Path(records[0].pos).is_file()
    # Per-term agreement, recomputed independently from the written image files.
    from PIL import Image

    def terms_of(paths, prompts):
        return oracle_terms([np.asarray(Image.open(p).convert("RGB")) for p in paths], prompts)

    prompts = [r.prompt for r in records]
    pos, neg = terms_of([r.pos for r in records], prompts), terms_of([r.neg for r in records], prompts)
    assert set(result.term_agreement) == set(TERMS)
    for t in TERMS:
        expected = float(((np.sign(pos[t] - neg[t]) + 1) / 2).mean())
        assert result.term_agreement[t] == pytest.approx(expected, abs=1e-9), t
    # The realism figures: each term's spread across a prompt's images, recomputed from the images given.
    for t in ("vivid", "size"):
        per_prompt = [oracle_terms(list(images), [prompt] * len(images))[t].std()
                      for prompt, images in world.items()]
        assert result.term_spread[t] == pytest.approx(float(np.mean(per_prompt)), abs=1e-9), t
    summary = json.loads((tmp_path / "pairs_summary.json").read_text())
    assert summary["realism"]["agreement_in_human_range"] == (0.65 <= result.oracle_agreement <= 0.78)
    assert set(summary["realism"]["varying_terms"]) <= set(TERMS)


def test_realism_criteria_name_what_fails():
    from toyworld.community import realism

    r = realism(0.70, {"vivid": 0.60, "size": 0.52}, {"vivid": 0.10, "size": 0.20, "sharp": 0.01})
    assert r["agreement_in_human_range"] and r["varying_terms"] == ["vivid", "size"]
    assert r["uncarried_varying_terms"] == ["size"] and not r["realistic"]
    assert realism(0.70, {"vivid": 0.60}, {"vivid": 0.10})["realistic"]
    assert not realism(0.80, {"vivid": 0.60}, {"vivid": 0.10})["realistic"]  # cleaner than any human panel


def test_pretraining_renders_span_the_quality_range_the_config_asks_for():
    from toyworld.datasets import render_dataset
    from toyworld.oracle import combine_terms

    plain, prompts = render_dataset(300, seed=0)
    mixed, mixed_prompts, quality = render_dataset(300, seed=0, quality_fraction=0.6, return_quality=True)
    assert mixed_prompts == prompts
    varied = ~np.isnan(quality)
    assert abs(varied.mean() - 0.6) < 0.08
    assert quality[varied].min() < 0.1 and quality[varied].max() > 0.9  # the whole range
    mixed_terms = oracle_terms(mixed, prompts)
    # Each aspect the quality knob moves rises with it (the spread is in the looks, not only the prompts).
    for t in ("vivid", "contrast", "sharp", "clean", "size"):
        assert np.corrcoef(quality[varied], mixed_terms[t][varied])[0, 1] > 0.15, t
    score, plain_score = combine_terms(mixed_terms), combine_terms(oracle_terms(plain, prompts))
    low, high = score[varied & (quality < 0.3)].mean(), score[varied & (quality > 0.7)].mean()
    assert high > low + 0.05 and low < plain_score.mean() < high  # plain renders sit in the middle
    _, _, none = render_dataset(20, seed=0, return_quality=True)
    assert np.isnan(none).all()


def test_community_accepts_paths_and_arrays(tmp_path):
    world = _small_world(seed=2, n_prompts=4, n=4)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    as_paths, as_arrays = {}, {}
    for k, (p, imgs) in enumerate(world.items()):
        as_paths[p] = []
        for j, im in enumerate(imgs):
            im.save(img_dir / f"{k}_{j}.png")
            as_paths[p].append(str(img_dir / f"{k}_{j}.png"))
        as_arrays[p] = np.stack([np.asarray(im) for im in imgs])  # (n, 32, 32, 3)
    cfg = BehaviourConfig(prompts_per_user=4)
    by_path = pd.read_parquet(build_pairs(as_paths, 10, 3, tmp_path / "p", cfg))
    by_array = pd.read_parquet(build_pairs(as_arrays, 10, 3, tmp_path / "q", cfg))
    assert len(by_path) == len(by_array) > 0  # same pixels, same seed -> same choices
    assert by_path.pos_path.str.startswith("../imgs/").all()
    assert by_array.pos_path.str.startswith("images/").all()


def test_make_toy_pairs_script_writes_train_and_heldout(tmp_path, capsys):
    from toyworld.cli import make_pairs_main

    assert make_pairs_main(["--out", str(tmp_path), "--set", "n_train_prompts=12", "--set",
                 "n_heldout_prompts=6", "--set", "n_candidates=4", "--set", "users_per_prompt=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    train = pd.read_parquet(tmp_path / "train" / "pairs.parquet")
    assert printed["train"]["n_pairs"] == len(train) > 0
    held = pd.read_parquet(tmp_path / "heldout" / "pairs.parquet")
    assert set(held.prompt) <= set(split_prompts(0)[1])


def test_reading_reports_geometry():
    scene = Scene("triangle", "yellow", "black", "large", "bottom")
    r = read_image(render(scene, np.random.default_rng(3)))
    assert r.found and r.shape == "triangle" and 0.4 < r.extent < 0.62
    assert abs(r.cy - ANCHORS["bottom"][1]) < 0.07


@pytest.mark.skipif(not (ASSET / "critic.safetensors").is_file(), reason="toy CLIP asset not built")
def test_shipped_toy_clip_loads_fp16_and_beats_chance_on_colour():
    import torch

    import reward
    from toyworld.pretrain_clip import zero_shot_accuracy

    assert (ASSET / "critic.safetensors").stat().st_size <= 10.5e6
    critic = reward.load(str(ASSET))
    assert next(critic.parameters()).dtype == torch.float32  # fp16 on disk, upcast on load
    images, prompts = render_dataset(160, seed=99, split="heldout")
    acc = zero_shot_accuracy(critic, images, prompts)
    assert acc["zero_shot_colour"] > 3 * acc["chance_colour"], acc
    assert acc["zero_shot_background"] > 3 * acc["chance_background"], acc


def test_clip_pretraining_batches_hold_one_attribute_hard_negatives():
    from toyworld.pretrain_clip import hard_negative_prompts, render_batch
    from toyworld.world import ATTRIBUTES

    train = split_prompts(0)[0]
    prompts = hard_negative_prompts(np.random.default_rng(0), train, batch_size=64, group_size=4)
    assert len(prompts) == 64 and set(prompts) <= set(train)
    scenes = [parse_prompt(p) for p in prompts]
    # Every prompt has a batch-mate that differs from it in exactly one attribute.
    for i, a in enumerate(scenes):
        diffs = [sum(getattr(a, f) != getattr(b, f) for f in ATTRIBUTES) for j, b in enumerate(scenes)
                 if j != i]
        assert 1 in diffs, prompts[i]
    plain = render_batch(prompts[:8], np.random.default_rng(1), varied_looks=0.0)
    varied = render_batch(prompts[:8], np.random.default_rng(1), varied_looks=1.0)
    assert plain.shape == varied.shape == (8, 32, 32, 3) and plain.dtype == np.uint8
    assert all(check(img, s)["colour"] and check(img, s)["background"] for img, s in zip(plain, scenes))
    # Varied looks scatter the aspects the oracle measures (placement, saturation, grain, ...).
    spread = lambda imgs: oracle_score(imgs, prompts[:8]).std()  # noqa: E731
    assert spread(varied) > spread(plain)


def test_caption_set_feeds_the_refl_regulariser_loader(tmp_path):
    from refl.reg_pool import load_caption_images
    from toyworld.datasets import write_caption_set
    from toyworld.world import parse_prompt, split_prompts

    table = write_caption_set(tmp_path / "renders", n=6, seed=1)
    images, captions = load_caption_images(table, "image", "caption", size=32, limit=6, seed=0)
    assert images.shape == (6, 3, 32, 32) and len(captions) == 6
    train = set(split_prompts(seed=0)[0])
    assert all(c in train and parse_prompt(c) for c in captions)  # training-split prompts only
    assert images.std() > 0.05  # real renders, not blank canvases


def test_bad_input_3_sweep_toy_pairs_into_a_file_is_refused_before_rendering(tmp_path, capsys):
    """It rendered every candidate first, then failed with '[Errno 20] Not a directory'."""
    from toyworld.cli import make_pairs_main

    (tmp_path / "notes").write_text("mine")
    assert make_pairs_main(["--out", str(tmp_path / "notes"), "--set", "n_train_prompts=2",
                            "--set", "n_heldout_prompts=2"]) == 2
    assert "output_dir" in (err := capsys.readouterr().err) and "is a file; name a folder" in err


@pytest.mark.parametrize("name", ["study_main", "flywheel_main", "arms_main", "sweep_main"])
def test_bad_input_world_commands_name_a_missing_demo_in_one_line(name, tmp_path, capsys):
    """Every command run on a finished demo refuses a folder that is not one with one line and exit 2 (the
    arms command raised a traceback: the merge had dropped its @command)."""
    from toyworld import cli

    assert getattr(cli, name)(["--demo", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err
