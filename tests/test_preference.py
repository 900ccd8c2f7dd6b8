"""preference/: the DPO and KTO losses against hand computations, the reference pass is the base model bit
for bit, the feedback readers (every pair format; labelled images and their bad rows), and tiny bf16 runs of
both methods that train, resume exactly and save a LoRA the stock pipeline reproduces."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.lora import randomise_lora_b
from helpers.pairs import pickapic_rows, write_shards
from helpers.training import PROMPTS, lora_file

from preference.objectives import dpo_loss, kto_loss, kto_reference_point

# Two cores shared by several test runs: one intra-op thread avoids OpenMP spin-waiting.
torch.set_num_threads(1)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_is_the_hand_computation_with_the_mean_outside():
    e_w, e_l = [0.30, 0.10, 0.52], [0.20, 0.40, 0.50]
    r_w, r_l = [0.25, 0.12, 0.50], [0.26, 0.38, 0.47]
    beta = 40.0
    z = [-beta / 2 * ((ew - rw) - (el - rl)) for ew, el, rw, rl in zip(e_w, e_l, r_w, r_l)]
    hand = sum(-_log_sigmoid(v) for v in z) / len(z)
    out = dpo_loss(*(torch.tensor(v) for v in (e_w, e_l, r_w, r_l)), beta)
    assert out["loss"].item() == pytest.approx(hand, rel=1e-6)
    assert out["accuracy"].item() == pytest.approx(sum(v > 0 for v in z) / 3)
    mean_inside = -_log_sigmoid(sum(z) / len(z))  # diffusers issue #6702's version
    assert abs(out["loss"].item() - mean_inside) > 0.05
    # A kept tie (label 0.5) weighs both orders alike: swapping the images leaves its loss unchanged.
    half = torch.full((3,), 0.5)
    a = dpo_loss(*(torch.tensor(v) for v in (e_w, e_l, r_w, r_l)), beta, label=half)["loss"]
    b = dpo_loss(*(torch.tensor(v) for v in (e_l, e_w, r_l, r_w)), beta, label=half)["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    only_first = torch.tensor([1.0, 0.0, 0.0])
    weighted = dpo_loss(*(torch.tensor(v) for v in (e_w, e_l, r_w, r_l)), beta, weight=only_first)
    assert weighted["loss"].item() == pytest.approx(-_log_sigmoid(z[0]) / 3, rel=1e-6)


def test_kto_loss_is_the_hand_computation():
    e, r = [0.30, 0.10, 0.52, 0.2], [0.25, 0.12, 0.50, 0.3]
    liked = [1.0, 0.0, 1.0, 0.0]
    kl_e, kl_r = [0.29, 0.2, 0.4, 0.19], [0.30, 0.22, 0.41, 0.20]
    beta, lam_d, lam_u = 30.0, 1.2, 0.8
    kl = [-beta / 2 * (a - b) for a, b in zip(kl_e, kl_r)]
    z0 = max(0.0, sum(kl) / len(kl))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    reward = [-beta / 2 * (a - b) for a, b in zip(e, r)]
    hand = sum(lam_d * (1 - sig(rw - z0)) if y else lam_u * (1 - sig(z0 - rw))
               for rw, y in zip(reward, liked)) / 4
    kl_t = -beta / 2 * (torch.tensor(kl_e) - torch.tensor(kl_r))
    z0_t = kto_reference_point(kl_t.sum(), torch.tensor(4.0))
    assert z0_t.item() == pytest.approx(z0, rel=1e-6) and z0 > 0
    out = kto_loss(torch.tensor(e), torch.tensor(r), torch.tensor(liked), z0_t, beta, lam_d, lam_u)
    assert out["loss"].item() == pytest.approx(hand, rel=1e-6)
    # The reference point is clamped at 0 and carries no gradient.
    assert kto_reference_point(torch.tensor(-3.0), torch.tensor(2.0)).item() == 0.0
    x = torch.tensor([0.5], requires_grad=True)
    assert not kto_reference_point(x.sum(), torch.tensor(1.0)).requires_grad


@pytest.mark.parametrize("preset", ["tiny", "tiny-v", "tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_reference_pass_is_the_base_model_bit_for_bit(preset, dtype):
    from preference.step import denoising_errors, draw_noise, tuned_and_reference_errors
    from refl import conditioning
    from refl.components import load_components
    from refl.lora import LoraConfig, add_lora

    components = load_components(preset).to(dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    size = components.latent_size if components.is_flow else 2  # FLUX packs 2x2 patches
    latents = torch.randn(2, components.latent_channels, size, size, generator=gen)  # (B, C, h, w)
    noise, t = draw_noise(components, latents, gen)
    with torch.no_grad(), components.autocast():
        cond = conditioning.encode(components, PROMPTS[:2])
        base = denoising_errors(components, latents, cond, noise, t, guidance_scale=3.5)  # (B,)
    add_lora(components, LoraConfig(rank=4, alpha=8.0, train_text_encoder=True))
    randomise_lora_b(components)
    with components.autocast():
        tuned, ref = tuned_and_reference_errors(components, latents, PROMPTS[:2], noise, t, 3.5)  # (B,) each
    assert torch.equal(ref, base)  # adapters off = the base, exactly (text encoders' adapters too)
    assert (tuned - base).abs().max() > 1e-4 and tuned.requires_grad and not ref.requires_grad


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_the_flow_error_is_the_hand_computation(preset):
    """x_sigma = (1 - sigma) x0 + sigma noise reaches the transformer (FLUX: packed, at sigma itself and its
    guidance embedding), and the error is the mean of (velocity - (noise - x0))^2 over the latent."""
    from diffusers import FluxPipeline

    from preference.step import denoising_errors
    from refl import conditioning
    from refl.components import load_components

    components = load_components(preset)
    gen = torch.Generator().manual_seed(0)
    c, h = components.latent_channels, components.latent_size
    x0, noise = torch.randn(2, 1, c, h, h, generator=gen).unbind(0)  # (1, C, h, w) each: one example
    t = torch.tensor([250.0])  # sigma 0.25
    seen = {}

    def pre(module, args, kwargs):
        seen["input"], seen["timestep"] = kwargs["hidden_states"].clone(), kwargs["timestep"].clone()
        seen["guidance"] = kwargs.get("guidance")

    def post(module, args, kwargs, out):
        seen["output"] = out.sample.detach().clone()

    components.transformer.register_forward_pre_hook(pre, with_kwargs=True)
    components.transformer.register_forward_hook(post, with_kwargs=True)
    with torch.no_grad():
        error = denoising_errors(components, x0, conditioning.encode(components, PROMPTS[:1]), noise, t,
                                 guidance_scale=3.5)  # (1,)
    noisy, target = 0.75 * x0 + 0.25 * noise, noise - x0  # (1, C, h, w) each, by hand
    if preset == "tiny-flux":  # 2x2 packing is a permutation of the elements: the mean of squares keeps
        pack = lambda x: FluxPipeline._pack_latents(x, 1, c, h, h)  # noqa: E731
        noisy, target, noise = pack(noisy), pack(target), pack(noise)  # (1, h/2 * w/2, 4C) each
        assert seen["timestep"].tolist() == [0.25] and seen["guidance"].tolist() == [3.5]
    else:
        assert seen["timestep"].tolist() == [250.0] and seen["guidance"] is None
    torch.testing.assert_close(seen["input"], noisy, rtol=0, atol=1e-6)
    hand = (seen["output"] - target).pow(2).mean()
    assert error.shape == (1,) and error.item() == pytest.approx(hand.item(), rel=1e-6)
    assert abs(error.item() - (seen["output"] - noise).pow(2).mean().item()) > 1e-3  # not epsilon's error


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny-flux"])
def test_flow_timesteps_are_drawn_as_the_trainers_draw_them(preset):
    """logit_normal: u = sigmoid(N(0, 1)) indexes the training scheduler's sigmas, shifted for SD 3 (its
    static shift 3.0), unshifted for FLUX (its shift depends on the image size, at sampling only)."""
    from refl.components import load_components
    from refl.step import flow_training_timesteps

    components = load_components(preset)
    n = 4000
    t = flow_training_timesteps(components, n, torch.Generator().manual_seed(0), "logit_normal")  # (n,)
    u = torch.sigmoid(torch.randn(n, generator=torch.Generator().manual_seed(0)))  # the same draw, by hand
    s = (1000 - (u * 1000).long()).float() / 1000  # (n,) the unshifted sigma at that index
    config = components.scheduler.config
    shift = 1.0 if config.get("use_dynamic_shifting", False) else config.shift
    assert (preset == "tiny-sd3") == (shift == 3.0)
    torch.testing.assert_close(t / 1000, shift * s / (1 + (shift - 1) * s), rtol=0, atol=1e-5)
    logit = torch.logit(s.clamp(1e-3, 1 - 1e-3))
    assert abs(logit.mean().item()) < 0.1 and abs(logit.std().item() - 1) < 0.1
    uniform = flow_training_timesteps(components, n, torch.Generator().manual_seed(0), "uniform") / 1000
    assert (uniform < 0.1).float().mean() > 0.02  # reaches where logit-normal hardly goes
    with pytest.raises(ValueError, match="choose one of"):
        flow_training_timesteps(components, 2, torch.Generator(), "lognormal")


def test_a_dpo_step_with_precomputed_embeddings_equals_live_encoding_bf16():
    from preference.step import dpo_step
    from refl.components import load_components
    from refl.lora import LoraConfig, add_lora
    from refl.text_embeddings import precompute_text_embeddings

    components = load_components("tiny-flux").to(dtype=torch.bfloat16)
    add_lora(components, LoraConfig(rank=2, alpha=4.0))
    randomise_lora_b(components, seed=3)
    params = {n: p for n, p in components.transformer.named_parameters() if "lora_" in n}
    images = torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # (pos / neg, B, ...)
    batch = {"prompt": PROMPTS[:2], "pos": images[0], "neg": images[1], "label": torch.ones(2),
             "weight": torch.ones(2)}

    def update():
        for p in params.values():
            p.grad = None
        out = dpo_step(components, batch, 50.0, torch.Generator().manual_seed(1), guidance_scale=3.5)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in params.items()}

    live, live_grads = update()
    precompute_text_embeddings(components, PROMPTS[:2])
    assert components.text_encoders() == {}
    cached, cached_grads = update()
    assert torch.isfinite(live) and torch.equal(live, cached)
    assert all(torch.equal(live_grads[n], cached_grads[n]) for n in params)
    assert sum(g.abs().sum() for g in cached_grads.values()) > 0


def test_precomputed_embeddings_stay_off_when_they_would_not_fit(monkeypatch, caplog):
    import refl.text_embeddings as te
    from refl.components import load_components

    components = load_components("tiny-sd3")
    assert te.precompute_wanted(components, None, PROMPTS)  # a few KiB: on
    monkeypatch.setattr(te, "MAX_MEMORY_SHARE", 1e-12)
    with caplog.at_level(logging.WARNING, logger="refl.text_embeddings"):
        assert not te.precompute_wanted(components, None, PROMPTS)
    assert "text embeddings not precomputed: those of the 4 prompts would take" in caplog.text
    assert te.precompute_wanted(components, True, PROMPTS)  # asked for: on
    assert not te.precompute_wanted(load_components("tiny"), None, PROMPTS)  # a UNet: off


def _labelled_table(pairs_parquet, out):
    """Liked / not-liked images from a pairs file: every preferred image liked, every rejected one not (as
    the toy community's remixed and seen-but-not-remixed images)."""
    pairs = pd.read_parquet(pairs_parquet)
    base = pairs_parquet.parent
    rows = [{"prompt": p, "image": str(base / img), "label": y}
            for p, pos, neg in pairs[["prompt", "pos_path", "neg_path"]].itertuples(index=False)
            for img, y in ((pos, 1.0), (neg, 0.0))]
    pd.DataFrame(rows).to_parquet(out)
    return out


def test_feedback_streams_read_every_pair_format_and_labelled_images(tmp_path):
    from preference.config import PreferenceDataConfig
    from preference.data import FeedbackStream
    from reward.data import DataError, LabelShards
    from reward.synthetic import make_colour_pairs

    shards = write_shards(tmp_path / "pickapic", pickapic_rows(24, size=8), n_shards=2, row_group=4)
    data = PreferenceDataConfig(train=str(shards[0].parent / "train-*.parquet"))
    stream = FeedbackStream("dpo", data, seed=0, batch_size=3, rank=0, world=1, image_size=16)
    assert len(stream.dataset) == 16  # 24 rows, every third a tie, dropped (data.tie_policy=drop)
    first = [b for _, b in zip(range(4), stream.batches(0))]
    assert first[0][1]["pos"].shape == (3, 3, 16, 16)
    again = next(stream.batches(3))  # a resumed run reads on at micro-batch 3, as the run did
    assert again[0] == 3 and again[1]["prompt"] == first[3][1]["prompt"]

    pairs = make_colour_pairs(tmp_path / "colour", n_pairs=6, size=16, seed=0)
    table = pd.read_parquet(_labelled_table(pairs, tmp_path / "labels.parquet"))
    labels = FeedbackStream("kto", PreferenceDataConfig(train=str(tmp_path / "labels.parquet")), seed=0,
                            batch_size=4, rank=0, world=1, image_size=16)
    assert len(labels.dataset) == 12 and sorted(labels.dataset.labels.tolist()) == [0.0] * 6 + [1.0] * 6
    table.loc[3, "label"] = 0.5
    table.loc[5, "image"] = str(tmp_path / "missing.png")
    table.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="row 3: label=0.5"):
        LabelShards(tmp_path / "bad.parquet", 16)
    skipped = LabelShards(tmp_path / "bad.parquet", 16, on_bad_row="skip")
    assert len(skipped) == 10 and skipped.n_bad_rows == 2


def _run_overrides(out, data, method, model, updates=4, family="sd"):
    flow = ["scheduler=flow_euler"] if family in ("sd3", "flux") else []
    return [f"train.output_dir={out}", f"model.name={model}", f"method={method}", f"data.train={data}",
            f"train.max_updates={updates}", "train.batch_size=2", "train.gradient_accumulation=2",
            "train.lr=1e-2",
            "train.lr_schedule=cosine", "train.warmup_updates=1", "train.checkpoint_every=2",
            "train.validate_every=2", "train.validation_prompts=[a red picture]",
            "train.validation_num_inference_steps=2", "train.heldout_evaluators=[clip:tiny-clip]",
            "train.mixed_precision=bf16", "beta=50", "lora.dropout=0.1", *flow]


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])  # the flow families in flow form
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_tiny_bf16_run_trains_resumes_exactly_and_loads_in_the_stock_pipeline(method, family, base_dir,
                                                                               tmp_path, monkeypatch, caplog):
    import preference.train as ptrain
    from preference.config import PreferenceConfig
    from refl.components import (
        FAMILY_PIPELINES,
        build_pipeline,
        load_components,
        pipeline_class,
        save_pipeline,
    )
    from refl.lora import LoraConfig, add_lora, load_lora_state
    from reward.synthetic import make_colour_pairs
    from runkit.config import load_config

    base = base_dir if family == "sd" else save_pipeline(load_components(f"tiny-{family}"), tmp_path / "base")
    pairs = make_colour_pairs(tmp_path / "colour", n_pairs=8, size=16, seed=0)
    data = pairs if method == "dpo" else _labelled_table(pairs, tmp_path / "labels.parquet")

    def overrides(out):
        return _run_overrides(tmp_path / out, data, method, base, family=family)

    with caplog.at_level(logging.INFO, logger="refl.text_embeddings"):
        full = ptrain.train(load_config(PreferenceConfig, None, overrides("full")))
    assert full["updates"] == 4 and math.isfinite(full["train/loss"])
    # The flow families encode the feedback's prompts, the validation prompt and "" once (null = on for them).
    n_prompts = len(set(pd.read_parquet(data)["prompt"])) + 2
    assert (f"text embeddings of {n_prompts} prompts computed once" in caplog.text) == (family != "sd")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows if "eval/heldout/clip:tiny-clip" in r] == [0, 2, 4]
    assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    card = (tmp_path / "full" / "lora" / "README.md").read_text()
    assert "Diffusion-" in card and f"| model family | `{family}` (`{FAMILY_PIPELINES[family]}`) |" in card
    assert ("flow form: sigma `logit_normal`, velocity target" in card) == (family != "sd")
    # What the run spent, in denoiser evaluations (images): per micro-batch of 2 pairs (dpo) the tuned and the
    # reference pass on 4 images, back-propagated through the tuned one; per 2 images (kto) those two passes
    # and both again on mismatched prompts for the reference point, without gradient. 4 updates x 2
    # micro-batches; 3 validations of 1 prompt x its images x 2 steps x 2 (CFG).
    cfg = load_config(PreferenceConfig, None, overrides("full"))
    images = 4 if method == "dpo" else 2
    per_micro = {"dpo": (2 * images, images), "kto": (4 * images, images)}[method]
    cfg_factor = 2 if cfg.train.validation_guidance_scale > 1 else 1
    validation = 3 * cfg.train.validation_images_per_prompt * 2 * cfg_factor
    spent = full["compute"]
    assert (spent["denoiser_forwards"], spent["denoiser_backwards"]) == (8 * per_micro[0], 8 * per_micro[1])
    assert spent["validation_denoiser_forwards"] == validation and spent["denoiser_recomputed"] == 0
    assert spent["seconds_training"] > 0 and spent["seconds_validating"] > 0
    assert json.loads((tmp_path / "full" / "result.json").read_text())["compute"] == spent
    a = lora_file(tmp_path / "full" / "checkpoints" / "update-000004")
    start = lora_file(tmp_path / "full" / "checkpoints" / "update-000002")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # training moved the LoRA

    step = ptrain.dpo_step if method == "dpo" else ptrain.kto_step
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # dies in update 3, after the update-2 checkpoint (2 micro-batches per update)
            raise KeyboardInterrupt("simulated crash")
        return step(*args, **kwargs)

    monkeypatch.setattr(ptrain, f"{method}_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        ptrain.train(load_config(PreferenceConfig, None, overrides("resumed")))
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("update-*")] == ["update-000002"]
    monkeypatch.setattr(ptrain, f"{method}_step", step)
    again = [*overrides("resumed"), "train.resume=latest"]
    resumed = ptrain.train(load_config(PreferenceConfig, None, again))
    # the counts carry on from the checkpoint: the work lost to the crash is not counted
    assert {k: v for k, v in resumed["compute"].items() if not k.startswith("seconds")} == {
        k: v for k, v in spent.items() if not k.startswith("seconds")}
    b = lora_file(tmp_path / "resumed" / "checkpoints" / "update-000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Our pipeline with the trained LoRA and the stock pipeline with the saved folder draw the same images.
    components = load_components(str(base))
    add_lora(components, LoraConfig(rank=4, alpha=4.0, dropout=0.1))
    load_lora_state(components, a)
    components.denoiser.eval()  # the adapters' dropout modules were made in training mode
    size = components.image_size

    def run(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    height=size, width=size, output_type="np").images

    ours = run(build_pipeline(components))
    extra = {"safety_checker": None} if family == "sd" else {}
    stock = pipeline_class(family).from_pretrained(base, **extra)
    base_images = run(stock)
    stock.load_lora_weights(tmp_path / "full" / "lora")
    assert np.abs(ours - base_images).max() > 1e-4  # the LoRA changes the images
    assert np.abs(ours - run(stock)).max() < 1e-5  # also: the saved folder carries no dropout to sample with


def test_flow_settings_refused_in_one_line(tmp_path, monkeypatch):
    """A UNet sampler on a flow model is refused before the model loads (not at the first validation),
    naming the key; so is an unknown timestep density."""
    import preference.train as ptrain
    from preference.config import PreferenceConfig
    from reward.synthetic import make_colour_pairs
    from runkit.config import load_config

    pairs = make_colour_pairs(tmp_path / "colour", n_pairs=4, size=16, seed=0)
    overrides = _run_overrides(tmp_path / "run", pairs, "dpo", "tiny-sd3")  # no scheduler=flow_euler
    monkeypatch.setattr(ptrain, "prepare_lora_training",
                        lambda *a, **k: pytest.fail("the model loaded before the sampler was checked"))
    with pytest.raises(ValueError, match=r"^scheduler: scheduler 'ddim' does not fit .*flow_euler"):
        ptrain.train(load_config(PreferenceConfig, None, overrides))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="timestep_density='lognormal'; choose one of logit_normal, uniform"):
        load_config(PreferenceConfig, None, [*overrides, "timestep_density=lognormal"])
