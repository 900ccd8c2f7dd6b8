"""reward/standard/: the standard reward models, built tiny, saved as released, checked against upstream.

Tiny variants go through the loaders' own code (spec strings, file layouts, transforms); only the
architecture is small (`model=tiny-clip`, a 16 px transformers CLIP). Full sizes are `slow` tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reward.standard import STANDARD_KINDS, WeightsError, load_standard, parse_standard_spec, transform_images

torch.set_num_threads(1)
PROMPTS = ["a red square on a blue background", "a green circle"]


# --------------------------------------------------------------------------- tiny weights in upstream layouts
def _tiny_open_clip():
    import open_clip

    from reward.model import resolve_model_name

    torch.manual_seed(0)
    return open_clip.create_model(resolve_model_name("tiny-clip"), pretrained=None)


def _tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random tiny weights written as each project releases them; returns spec strings and the originals."""
    from reward.standard import ScoreMLP

    root = tmp_path_factory.mktemp("standard_weights")
    clip = _tiny_open_clip()
    torch.save(clip.state_dict(), root / "tiny_openclip.pt")  # open_clip's own checkpoint layout
    hps = root / "hps"
    hps.mkdir()
    # HPS v2 releases {'state_dict': open_clip state dict}; written in fp16 to check the cast on load.
    torch.save({"state_dict": {k: v.half() for k, v in clip.state_dict().items()}},
               hps / "HPS_v2_compressed.pt")
    torch.manual_seed(1)
    mlp = ScoreMLP(16)
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")  # a plain state dict
    hf = _tiny_hf_clip()
    hf.save_pretrained(root / "pickscore")
    _imagereward_release(root / "imagereward")
    return {
        "root": root, "clip": clip, "mlp": mlp, "hf": hf,
        "specs": {
            "clipscore": f"clipscore:tiny-clip:{root / 'tiny_openclip.pt'}",
            "aesthetic": f"aesthetic:{root},backbone=tiny-clip:{root / 'tiny_openclip.pt'}",
            "pickscore": f"pickscore:{root / 'pickscore'}",
            "hpsv2": f"hpsv2:{hps},model=tiny-clip",
            "imagereward": f"imagereward:{root / 'imagereward'}",
        },
    }


def _images(seed=0, b=2, h=20, w=28):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# ----------------------------------------------------------------------------- round trips
def test_each_loader_round_trips_released_layout(weights):
    clip_sd = weights["clip"].state_dict()
    m = load_standard(weights["specs"]["clipscore"])
    assert all(torch.equal(m.clip.state_dict()[k], v) for k, v in clip_sd.items())
    m = load_standard(weights["specs"]["hpsv2"])
    # fp16 on disk -> fp32 model: every value is the fp16 value, exactly
    assert all(torch.equal(m.clip.state_dict()[k], v.half().float()) for k, v in clip_sd.items())
    m = load_standard(weights["specs"]["aesthetic"])
    assert all(torch.equal(m.mlp.state_dict()[k], v) for k, v in weights["mlp"].state_dict().items())
    assert all(torch.equal(m.clip.state_dict()[k], v) for k, v in clip_sd.items())
    m = load_standard(weights["specs"]["pickscore"])
    assert all(torch.equal(m.model.state_dict()[k], v) for k, v in weights["hf"].state_dict().items())
    assert m.model.logit_scale.item() == 3.0


def test_pickscore_also_reads_pytorch_model_bin(weights, tmp_path):
    hf = weights["hf"]
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # the 2023 release format
    m = load_standard(f"pickscore:{tmp_path}")
    assert all(torch.equal(m.model.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_wrong_or_missing_files_are_refused_naming_the_path(weights, tmp_path):
    sd = weights["clip"].state_dict()
    renamed = {("visual.NOPE" if k == "visual.proj" else k): v for k, v in sd.items()}
    torch.save({"state_dict": renamed}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(WeightsError,
                       match=rf"{tmp_path}.*missing.*visual.proj.*unexpected.*visual.NOPE.*state_dict"):
        load_standard(f"hpsv2:{tmp_path},model=tiny-clip")
    torch.save(sd, tmp_path / "flat.pt")  # a bare state dict where HPS wants {'state_dict': ...}
    with pytest.raises(WeightsError, match=r"flat.pt has no 'state_dict' entry"):
        load_standard(f"hpsv2:{tmp_path / 'flat.pt'},model=tiny-clip")
    bad_mlp = {k.replace("layers.7", "layers.8"): v for k, v in weights["mlp"].state_dict().items()}
    torch.save(bad_mlp, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(WeightsError, match=rf"aesthetic: {tmp_path}.*layers.7.weight"):
        load_standard(f"aesthetic:{tmp_path},backbone=tiny-clip")
    with pytest.raises(WeightsError, match=r"missing.pth does not exist.*sac\+logos"):
        load_standard(f"aesthetic:{tmp_path / 'missing.pth'},backbone=tiny-clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"empty has no HPS_v2.1_compressed.pt"):
        load_standard(f"hpsv21:{tmp_path / 'empty'}")
    with pytest.raises(WeightsError, match=r"has no config.json"):
        load_standard(f"pickscore:{tmp_path / 'empty'}")
    hf_dir = tmp_path / "hf"
    weights["hf"].config.save_pretrained(hf_dir)
    state = {k.replace("visual_projection",
                       "image_projection"): v for k, v in weights["hf"].state_dict().items()}
    torch.save(state, hf_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pickscore: .*hf does not match.*visual_projection"):
        load_standard(f"pickscore:{hf_dir}")


def test_hub_ids_honour_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"HPS_v2_compressed.pt from the hub repository xswu/HPSv2.*local "
                                           r"path"):
        load_standard("hpsv2:")
    with pytest.raises(WeightsError, match=r"pickscore: cannot load someone/PickScore_v9"):
        load_standard("pickscore:someone/PickScore_v9")


def test_spec_parsing_and_unknown_kinds_or_options():
    assert parse_standard_spec("clipscore:ViT-L-14:openai") == ("clipscore", "ViT-L-14:openai", {})
    assert parse_standard_spec("hpsv2:w/a.pt,model=tiny-clip") == ("hpsv2", "w/a.pt", {"model": "tiny-clip"})
    with pytest.raises(ValueError, match="unknown standard reward 'hps'"):
        parse_standard_spec("hps:x")
    with pytest.raises(ValueError, match="bad option 'backbone=x' for hpsv2.*model="):
        parse_standard_spec("hpsv2:x,backbone=x")
    assert set(STANDARD_KINDS) == {"clipscore", "aesthetic", "pickscore", "hpsv2", "hpsv21", "imagereward"}


# ----------------------------------------------------------------------------- scoring, ranking, gradients
@pytest.mark.parametrize("kind", ["clipscore", "aesthetic", "pickscore", "hpsv2", "imagereward"])
def test_tiny_models_score_rank_and_pass_gradients(weights, kind):
    model = load_standard(weights["specs"][kind])
    assert all(not p.requires_grad for p in model.parameters())
    images = _images(h=20, w=28).requires_grad_(True)  # non-square, not the model's size
    scores = model(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert scores[0] != scores[1]
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    # Ranking is per image: scoring each alone gives the batch's numbers, and one prompt broadcasts.
    with torch.no_grad():
        alone = torch.cat([model(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(alone, scores.detach(), rtol=1e-4, atol=1e-4)
        shared = model(images, PROMPTS[0])
        assert torch.allclose(shared[0], scores[0].detach(), atol=1e-4)
    # Brighter and darker versions of one image rank differently (the score reads the pixels).
    with torch.no_grad():
        pair = torch.stack([images[0].detach() * 0.2, (images[0].detach() * 0.2 + 0.8)])
        s = model(pair, PROMPTS[:1])
        assert (s[0] - s[1]).abs() > 1e-4


@pytest.mark.parametrize("kind", ["clipscore", "aesthetic", "pickscore", "hpsv2", "imagereward"])
def test_tiny_models_score_in_bf16(weights, kind):
    model = load_standard(weights["specs"][kind])
    images = _images(seed=3)
    with torch.no_grad():
        ref = model(images, PROMPTS)
        half = load_standard(weights["specs"][kind], dtype=torch.bfloat16)
        low = half(images, PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(images, PROMPTS)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits; scores are O(1) (x100 for CLIP score, x3 for the tiny PickScore)
    scale = ref.abs().max().item() + 1.0
    assert (low - ref).abs().max().item() < 0.05 * scale
    assert (auto - ref).abs().max().item() < 0.05 * scale


# ----------------------------------------------------------------------------- preprocessing = upstream's
def _pil_and_tensor(h, w, seed=0):
    from PIL import ImageFilter

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(1.5))  # image-like, not white noise
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    return im, x


# Sizes chosen so that the long side after resizing exceeds S by an odd amount whose half rounds up
# (45 x 54 -> 16 x 19; 10 x 12 -> 16 x 19): torchvision's round() and transformers' floor() crops differ;
# 10 x 13 -> 16 x 20.8, truncated to 20 by both (rounding would give 21); 16 x 12 has HPS v2's long side
# already at S (padded, not resized).
SHAPES = [(45, 54), (10, 12), (54, 45), (10, 13), (16, 12)]


def _pil_tolerance(std):
    # PIL resizes in 8 bits: its output is rounded to 1/255 (0.5/255 error) and its fixed-point filter
    # adds a little; measured against torch's antialiased bicubic: max 1.1/255, mean 0.3/255 per pixel.
    return 1.5 / 255 / min(std), 0.5 / 255 / min(std)


def _close_to_pil(ours, ref, std):
    max_tol, mean_tol = _pil_tolerance(std)
    diff = (ours - ref).abs()
    assert ours.shape == ref.shape
    assert (diff.max().item() < max_tol
            and diff.mean().item() < mean_tol), (diff.max().item(), diff.mean().item())


@pytest.mark.parametrize("shape", SHAPES)
def test_open_clip_kinds_preprocess_like_open_clip(weights, shape):
    """clipscore and aesthetic: open_clip's own evaluation transform (the aesthetic predictor's `clip.load`
    preprocess is the same Resize(S, bicubic) + CenterCrop(S) + Normalize on PIL images)."""
    from open_clip.transform import image_transform

    im, x = _pil_and_tensor(*shape)
    for kind in ("clipscore", "aesthetic"):
        model = load_standard(weights["specs"][kind])
        t = model.transform
        ref = image_transform(t.size, is_train=False, mean=t.mean, std=t.std)(im)[None]
        _close_to_pil(model.preprocess(x), ref, t.std)


@pytest.mark.parametrize("shape", SHAPES)
def test_pickscore_preprocess_like_its_clip_processor(weights, shape):
    """PickScore's processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's CLIPImageProcessor (PIL): shortest
    edge to S bicubic, transformers' centre crop, OpenAI mean/std."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    im, x = _pil_and_tensor(*shape)
    model = load_standard(weights["specs"]["pickscore"])
    s = model.transform.size
    proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    ref = proc(images=im, return_tensors="pt")["pixel_values"]
    _close_to_pil(model.preprocess(x), ref, model.transform.std)


@pytest.mark.parametrize("shape", SHAPES)
def test_hpsv2_preprocess_like_its_fork(weights, shape):
    """HPS v2 (its open_clip fork, light_augmentation=True): ToTensor, longest side to S on the float tensor
    (torchvision bicubic), black padding split floor/ceil, Normalize. Both sides resize float tensors with
    the same kernel, so they agree to float rounding."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    im, _ = _pil_and_tensor(*shape)
    model = load_standard(weights["specs"]["hpsv2"])
    s, t = model.transform.size, model.transform
    ref = TF.to_tensor(im)
    h, w = ref.shape[1:]
    scale = s / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    ref = TF.resize(ref, [nh, nw], InterpolationMode.BICUBIC)
    ref = TF.pad(ref, [(s - nw) // 2, (s - nh) // 2, s - nw - (s - nw) // 2, s - nh - (s - nh) // 2], fill=0)
    ref = TF.normalize(ref, t.mean, t.std)[None]
    ours = model.preprocess(TF.to_tensor(im)[None])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_transform_is_differentiable_and_refuses_bad_shapes():
    from reward.standard import ImageTransform

    x = torch.rand(1, 3, 10, 12, requires_grad=True)
    for mode in ("crop", "pad", "squash"):
        transform_images(x, ImageTransform(size=16, mode=mode)).sum().backward()
        assert x.grad.abs().sum() > 0
        x.grad = None
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        transform_images(torch.rand(3, 8, 8), ImageTransform(size=16))


# ----------------------------------------------------------------------------- ImageReward (BLIP)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "on", "blue", "background",
         "green", "circle", "##s"]


def _imagereward_release(folder, seed=0, vocab=VOCAB, v=64, depth_v=1, patch=8, image=16, t=32, depth_t=1,
                         heads_t=2, n_pos=40):
    """An ImageReward.pt of random weights written with BLIP's own key names (vit.py / med.py / ImageReward's
    MLP) and a med_config.json. Default: tiny (ViT 64 wide, one 64-dim head like BLIP's; BERT 32; 16 px
    images in 8 px patches); the release is v=1024, depth_v=24, patch=16, image=224, t=768, depth_t=12,
    heads_t=12, n_pos=512 with a 30524-token vocabulary."""
    import json

    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    def ln(prefix, d, out):
        out[prefix + ".weight"], out[prefix + ".bias"] = 1 + r(d), r(d)

    def lin(prefix, o, i, out):
        out[prefix + ".weight"], out[prefix + ".bias"] = r(o, i), r(o)

    ff_v, ff_t, tokens = 4 * v, 2 * t if t < 64 else 4 * t, (image // patch) ** 2 + 1
    s = {"blip.visual_encoder.cls_token": r(1, 1, v), "blip.visual_encoder.pos_embed": r(1, tokens, v),
         "blip.visual_encoder.patch_embed.proj.weight": r(v, 3, patch, patch),
         "blip.visual_encoder.patch_embed.proj.bias": r(v)}
    for i in range(depth_v):
        b = f"blip.visual_encoder.blocks.{i}."
        ln(b + "norm1", v, s), lin(b + "attn.qkv", 3 * v, v, s), lin(b + "attn.proj", v, v, s), \
            ln(b + "norm2", v, s)
        lin(b + "mlp.fc1", ff_v, v, s), lin(b + "mlp.fc2", v, ff_v, s)
    ln("blip.visual_encoder.norm", v, s)
    e = "blip.text_encoder."
    s[e + "embeddings.word_embeddings.weight"] = r(len(vocab), t)
    s[e + "embeddings.position_embeddings.weight"] = r(n_pos, t)
    s[e + "embeddings.position_ids"] = torch.arange(n_pos)[None]  # a persistent buffer in BLIP's med.py
    ln(e + "embeddings.LayerNorm", t, s)
    for i in range(depth_t):
        layer = e + f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            lin(layer + f"attention.self.{name}", t, t, s)
            lin(layer + f"crossattention.self.{name}", t, t if name == "query" else v, s)
        for att in ("attention", "crossattention"):
            lin(layer + f"{att}.output.dense", t, t, s), ln(layer + f"{att}.output.LayerNorm", t, s)
        lin(layer + "intermediate.dense", ff_t, t, s), lin(layer + "output.dense", t, ff_t, s)
        ln(layer + "output.LayerNorm", t, s)
    lin("blip.vision_proj", 256, v, s), lin("blip.text_proj", 256, t, s)  # in the release, unused by scoring
    for i, (o, n) in zip((0, 2, 4, 6, 7), [(1024, t), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        lin(f"mlp.layers.{i}", o, n, s)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(s, folder / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": t, "initializer_range": 0.02, "intermediate_size": ff_t,
           "layer_norm_eps": 1e-12, "max_position_embeddings": n_pos, "model_type": "bert",
           "num_attention_heads": heads_t, "num_hidden_layers": depth_t, "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": len(vocab), "encoder_width": 768, "add_cross_attention": True}
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return s


# BLIP vit.py names -> transformers BlipVisionModel names, written out for the one-block test model.
_VIT_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
              "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
              "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
              "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
for _p in ("weight", "bias"):
    _VIT_NAMES.update({f"blocks.0.norm1.{_p}": f"encoder.layers.0.layer_norm1.{_p}",
                       f"blocks.0.norm2.{_p}": f"encoder.layers.0.layer_norm2.{_p}",
                       f"blocks.0.attn.qkv.{_p}": f"encoder.layers.0.self_attn.qkv.{_p}",
                       f"blocks.0.attn.proj.{_p}": f"encoder.layers.0.self_attn.projection.{_p}",
                       f"blocks.0.mlp.fc1.{_p}": f"encoder.layers.0.mlp.fc1.{_p}",
                       f"blocks.0.mlp.fc2.{_p}": f"encoder.layers.0.mlp.fc2.{_p}"})


@pytest.fixture(scope="module")
def imagereward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    state = _imagereward_release(folder)
    return folder, state


def test_imagereward_round_trip_and_tokens(imagereward):
    folder, state = imagereward
    model = load_standard(f"imagereward:{folder}")
    vision, text, mlp = model.vision.state_dict(), model.text.state_dict(), model.mlp.state_dict()
    assert len(vision) == len(_VIT_NAMES)
    for ours, theirs in _VIT_NAMES.items():
        assert torch.equal(vision[theirs], state["blip.visual_encoder." + ours]), ours
    for key, value in text.items():
        assert torch.equal(value, state["blip.text_encoder." + key]), key
    for key, value in mlp.items():
        assert torch.equal(value, state["mlp." + key]), key
    assert model.vision.config.layer_norm_eps == 1e-6 and model.vision.config.image_size == 16
    # The same file given by path, and the prompt padded to 35 BERT tokens as ImageReward does.
    again = load_standard(f"imagereward:{folder / 'ImageReward.pt'}")
    assert torch.equal(again.mlp.layers[0].weight, model.mlp.layers[0].weight)
    ids = model.tokenizer(["A red squares"], padding="max_length", truncation=True,
                          max_length=35).input_ids[0]
    assert ids[:6] == [2, 5, 6, 7, 13, 3] and ids[6:] == [0] * 29


def test_imagereward_applies_the_published_normalisation(imagereward):
    from reward.standard.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD

    folder, _ = imagereward
    model = load_standard(f"imagereward:{folder}")
    images = _images(h=20, w=28)
    with torch.no_grad():
        # The normalisation is the published one: undo it and the raw MLP output of the [CLS] token remains.
        pixels = model.preprocess(images)
        emb = model.vision(pixel_values=pixels).last_hidden_state
        tok = model.tokenizer(["a red square"] * 2, padding="max_length", max_length=35, return_tensors="pt")
        cls = model.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                         encoder_hidden_states=emb,
                         encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)
                         ).last_hidden_state[:, 0]
        raw = model.mlp(cls)[:, 0]
        torch.testing.assert_close(model(images, "a red square"),
                                   (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_imagereward_preprocess_like_its_transform(imagereward, shape):
    """ImageReward's _transform: Resize(S, bicubic), CenterCrop(S), ToTensor, Normalize(OpenAI), on PIL."""
    from torchvision import transforms as T

    folder, _ = imagereward
    model = load_standard(f"imagereward:{folder}")
    s, t = model.transform.size, model.transform
    im, x = _pil_and_tensor(*shape)
    ref = T.Compose([T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s), T.ToTensor(),
                     T.Normalize(t.mean, t.std)])(im)[None]
    _close_to_pil(model.preprocess(x), ref, t.std)


def test_imagereward_refuses_wrong_files(imagereward, tmp_path):
    folder, state = imagereward
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("med_config.json", "vocab.txt"):
        (bad / name).write_text((folder / name).read_text())
    torch.save({k.replace("blocks.0.attn.qkv", "blocks.0.attn.qkv2"): v for k, v in state.items()},
               bad / "ImageReward.pt")
    with pytest.raises(WeightsError, match=rf"{bad}.*missing.*self_attn.qkv.*unexpected.*qkv2"):
        load_standard(f"imagereward:{bad}")
    torch.save({"model": state}, bad / "ImageReward.pt")  # nested one level too deep
    with pytest.raises(WeightsError, match=r"ImageReward.pt does not look like ImageReward.pt"):
        load_standard(f"imagereward:{bad}")
    (bad / "med_config.json").unlink()
    with pytest.raises(WeightsError, match=r"has no med_config.json"):
        load_standard(f"imagereward:{bad}")


# ----------------------------------------------------------------------------- validate_reward baselines
def _pickapic_file(path, n=12, n_first=8, ties=1):
    """A Pick-a-Pic-style parquet of encoded non-square images: n_first rows prefer jpg_0, the rest jpg_1."""
    import io

    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n + ties):
        enc = []
        for _ in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(buf, format="PNG")
            enc.append(buf.getvalue())
        l0 = 0.5 if i >= n else float(i < n_first)
        rows.append({"caption": PROMPTS[i % 2], "jpg_0": enc[0], "jpg_1": enc[1], "label_0": l0,
                     "label_1": 1 - l0})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_validate_reward_with_two_standard_baselines_writes_the_table(weights, tmp_path):
    import io
    import json

    import pandas as pd

    from reward.cli import validate_main
    from reward.model import CriticConfig, create_critic

    pairs = _pickapic_file(tmp_path / "pairs.parquet")
    critic = create_critic(CriticConfig(model_name="tiny-clip", training_mode="all"))
    critic.save_pretrained(tmp_path / "critic")
    out = tmp_path / "val.json"
    code = validate_main([str(pairs), "--critic", str(tmp_path / "critic"), "--output-file", str(out),
                          "--baselines", weights["specs"]["hpsv2"], "--baselines",
                          weights["specs"]["pickscore"]])
    assert code == 0
    report = json.loads(out.read_text())
    assert [b["model"] for b in report["baselines"]] == [weights["specs"]["hpsv2"],
                                                         weights["specs"]["pickscore"]]
    for row in [report["tuned"], *report["baselines"]]:
        assert row["n_pairs"] == 12 and row["n_tied_labels"] == 1
        lo, hi = row["ci95"]
        assert 0 <= lo <= row["pairwise_accuracy"] <= hi <= 1
    assert report["majority"] == {"rate": 8 / 12, "rule": "always the first image", "n_pairs": 12}
    # The standard model's accuracy is the one its own scores give, pair by pair.
    from reward.standard import load_standard

    hps = load_standard(weights["specs"]["hpsv2"])
    df = pd.read_parquet(pairs)
    wins = []
    for row in df.itertuples():
        if row.label_0 == 0.5:
            continue
        ims = [torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
               .float() / 255 for b in (row.jpg_0, row.jpg_1)]
        with torch.no_grad():
            s = hps(torch.stack(ims), [row.caption])
        pos, neg = (s[0], s[1]) if row.label_0 > row.label_1 else (s[1], s[0])
        wins.append(1.0 if pos > neg else 0.5 if pos == neg else 0.0)
    assert report["baselines"][0]["pairwise_accuracy"] == pytest.approx(np.mean(wins))
    table = out.with_suffix(".md").read_text()
    assert "| chance | 0.500 |" in table and "| majority (always the first image) | 0.667 |" in table
    assert weights["specs"]["pickscore"] in table and f"critic {tmp_path / 'critic'}" in table
    # A wrong baseline file stops with exit code 2 and a message naming it.
    assert validate_main([str(pairs), "--critic", str(tmp_path / "critic"), "--output-file", str(out),
                          "--baselines", f"hpsv2:{tmp_path / 'nope.pt'}"]) == 2


# ----------------------------------------------------------------------------- harness evaluators
def test_compare_harness_runs_with_standard_evaluators(weights, tmp_path):
    import json

    from evaluation import harness as H
    from evaluation.config import CompareConfig
    from reward.evaluators import create_evaluator
    from runkit.config import load_config

    (tmp_path / "prompts.txt").write_text("a red square\na green circle\n")
    hps, pick = weights["specs"]["hpsv2"], weights["specs"]["pickscore"]
    cfg = load_config(CompareConfig, None, [
        "model.name=tiny", f"prompts_file={tmp_path / 'prompts.txt'}", "n_samples=2", "batch_size=2",
        "num_inference_steps=2", "guidance_scale=1.0", "critic=tiny-clip",
        f"evaluators=['{hps}', '{pick}']",
        "bootstrap_resamples=50", "report_image_px=32", f"output_dir={tmp_path / 'run'}", "device=cpu"])
    old = torch.get_num_threads()
    try:
        results = H.run_compare(cfg)
    finally:
        torch.set_num_threads(old)
    assert results["evaluators"] == ["critic:tiny-clip", hps, pick]
    for arm in results["arms"].values():
        assert set(arm["scores"]) == set(results["evaluators"])
        assert all(np.isfinite(arm["scores"][spec]["mean"]) for spec in (hps, pick))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["evaluators"] == results["evaluators"]
    # The evaluator gives the model's own scores on the stored uint8 images.
    ev = create_evaluator(hps)
    # Cached scores are keyed by the weights file's content, not just the spec's text.
    assert ev.fingerprint.startswith(f"{hps}|dir:") and ev.fingerprint.endswith(";name:tiny-clip")
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 28, 3), dtype=np.uint8)
    model = load_standard(hps)
    with torch.no_grad():
        direct = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
                       ["a", "b", "c"]).double().numpy()
    np.testing.assert_allclose(ev(images, ["a", "b", "c"]), direct, rtol=1e-6)


# ----------------------------------------------------------------------------- ReFL on a weighted mix
def test_refl_trains_on_a_weighted_mix_in_bf16_and_logs_each_term(weights, tmp_path):
    import json

    from refl.config import ReflConfig
    from refl.rewards import build_reward
    from refl.train import train
    from runkit.config import load_config

    hps_arg = weights["specs"]["hpsv2"].partition(":")[2]
    out = tmp_path / "run"
    overrides = [f"train.output_dir={out}", "model.name=tiny", "train.max_updates=2", "train.batch_size=2",
                 "train.gradient_accumulation=1", "train.lr=1e-2", "train.checkpoint_every=0",
                 "train.log_with=none",
                 "train.validation_prompts=[]", "step.num_inference_steps=3", "step.cut_range=[1,2]",
                 "train.mixed_precision=bf16", "reward.kind=mix", "reward.critic=tiny-clip",
                 "reward.mix={critic: 1.0, hpsv2: 0.5}", f"reward.standard.hpsv2={hps_arg}"]
    cfg = load_config(ReflConfig, None, overrides)
    result = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2
    for row in rows:
        assert {"train/reward/critic", "train/reward/hpsv2"} <= set(row)
        # The logged reward is the weighted sum of the logged (unweighted) terms.
        mixed = row["train/reward/critic"] + 0.5 * row["train/reward/hpsv2"]
        assert row["train/reward"] == pytest.approx(mixed, abs=1e-5)
        assert -1.0 <= row["train/reward/hpsv2"] <= 1.0 and row["train/reward/hpsv2"] != 0.0
    assert result["train/grad_norm"] > 0
    # A single standard model is a reward kind of its own; misspelt terms are refused.
    alone = build_reward(load_config(ReflConfig, None,
                                     ["reward.kind=hpsv2", f"reward.standard.hpsv2={hps_arg}"]).reward,
                         "cpu")
    images = _images(seed=5).requires_grad_(True)
    alone(images, PROMPTS).sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"reward.mix terms \['hps'\] are not reward kinds"):
        build_reward(load_config(ReflConfig, None, ["reward.kind=mix", "reward.mix={hps: 1.0}"]).reward,
                     "cpu")


def test_openai_tags_get_quickgelu(monkeypatch):
    """open_clip 3 builds ViT-L-14 with GELU for the `openai` tag (QuickGELU-trained) and only warns."""
    import open_clip

    from reward.standard.clip import open_clip_model

    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen.update(name=name, pretrained=pretrained, **kwargs)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(WeightsError, match="open_clip weights ViT-L-14:openai"):
        open_clip_model("ViT-L-14", "openai")
    assert seen == {"name": "ViT-L-14", "pretrained": "openai", "force_quick_gelu": True}
    with pytest.raises(WeightsError):
        open_clip_model("ViT-H-14", "laion2b_s32b_b79k")
    assert seen["force_quick_gelu"] is False


def test_shipped_standard_configs_load_and_their_specs_parse():
    from pathlib import Path

    from evaluation.config import CompareConfig
    from refl.config import ReflConfig
    from refl.rewards import REWARDS
    from runkit.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    compare = load_config(CompareConfig, root / "compare_sd15_standard.yaml")
    kinds = [parse_standard_spec(spec)[0] for spec in compare.evaluators]
    assert sorted(kinds) == sorted(STANDARD_KINDS)
    refl = load_config(ReflConfig, root / "refl_sd15_mix.yaml")
    assert refl.reward.kind == "mix" and refl.reward.mix == {"critic": 1.0, "hpsv21": 0.5}
    assert set(refl.reward.mix) <= set(REWARDS) and set(refl.reward.standard) <= set(STANDARD_KINDS)


def test_open_clip_vit_h_14_has_the_key_names_of_hps_v2s_fork(tmp_path):
    """HPS v2 saved its fork's ViT-H-14 state dict; our open_clip must build exactly those names and shapes
    (fork: hpsv2/src/open_clip/{model.py, transformer.py, model_configs/ViT-H-14.json}). The fork's config
    is compared as numbers, the names on a 2-block copy of it (the full model is a slow test)."""
    import json

    import open_clip

    fork_config = {"embed_dim": 1024,
                   "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                  "patch_size": 14},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                                "layers": 24}}
    assert open_clip.get_model_config("ViT-H-14") == fork_config
    small = json.loads(json.dumps(fork_config))
    small["vision_cfg"]["layers"], small["text_cfg"]["layers"] = 2, 2
    (tmp_path / "ViT-H-14-2blocks.json").write_text(json.dumps(small))
    open_clip.add_model_config(tmp_path / "ViT-H-14-2blocks.json")
    model = open_clip.create_model("ViT-H-14-2blocks", pretrained=None)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def blocks(prefix, n, d, ff):
        out = {}
        for i in range(n):
            b = f"{prefix}.resblocks.{i}."
            out.update({b + "ln_1.weight": (d,), b + "ln_1.bias": (d,), b + "attn.in_proj_weight": (3 * d, d),
                        b + "attn.in_proj_bias": (3 * d,), b + "attn.out_proj.weight": (d, d),
                        b + "attn.out_proj.bias": (d,), b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
                        b + "mlp.c_fc.weight": (ff, d), b + "mlp.c_fc.bias": (ff,),
                        b + "mlp.c_proj.weight": (d, ff), b + "mlp.c_proj.bias": (d,)})
        return out

    vw, tw, e = 1280, 1024, 1024
    fork = {"visual.conv1.weight": (vw, 3, 14, 14), "visual.class_embedding": (vw,),
            "visual.positional_embedding": (257, vw), "visual.ln_pre.weight": (vw,),
            "visual.ln_pre.bias": (vw,),
            "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,), "visual.proj": (vw, e),
            "token_embedding.weight": (49408, tw), "positional_embedding": (77, tw), "ln_final.weight": (tw,),
            "ln_final.bias": (tw,), "text_projection": (tw, e), "logit_scale": (),
            **blocks("visual.transformer", 2, vw, 4 * vw), **blocks("transformer", 2, tw, 4 * tw)}
    assert ours == fork


# ----------------------------------------------------------------------------- full size (slow; run by hand)
def _full_size_release(kind, root):
    """Random weights at the released architecture, written in the released layout; returns the spec."""
    import gc

    import open_clip

    from reward.standard import ScoreMLP

    if kind in ("clipscore", "aesthetic"):
        clip = open_clip.create_model("ViT-L-14-quickgelu", pretrained=None)
        torch.save(clip.state_dict(), root / "vit-l-14.pt")
        del clip
        if kind == "clipscore":
            return f"clipscore:ViT-L-14-quickgelu:{root / 'vit-l-14.pt'}"
        torch.save(ScoreMLP(768).state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
        return f"aesthetic:{root},backbone=ViT-L-14-quickgelu:{root / 'vit-l-14.pt'}"
    if kind == "hpsv2":
        clip = open_clip.create_model("ViT-H-14", pretrained=None)
        torch.save({"state_dict": {k: v.half() for k, v in clip.state_dict().items()}},
                   root / "HPS_v2_compressed.pt")
        del clip
        gc.collect()
        return f"hpsv2:{root / 'HPS_v2_compressed.pt'}"
    if kind == "pickscore":
        from transformers import CLIPConfig, CLIPModel

        # PickScore_v1 = laion CLIP-ViT-H-14-laion2B-s32B-b79K's architecture.
        config = CLIPConfig(
            text_config={"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 24,
                         "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu"},
            vision_config={"image_size": 224, "patch_size": 14, "hidden_size": 1280,
                           "intermediate_size": 5120,
                           "num_hidden_layers": 32, "num_attention_heads": 16, "hidden_act": "gelu"},
            projection_dim=1024)
        CLIPModel(config).save_pretrained(root / "PickScore_v1")
        gc.collect()
        return f"pickscore:{root / 'PickScore_v1'}"
    vocab = VOCAB + [f"tok{i}" for i in range(30524 - len(VOCAB))]
    _imagereward_release(root / "ImageReward", vocab=vocab, v=1024, depth_v=24, patch=16, image=224, t=768,
                         depth_t=12, heads_t=12, n_pos=512)
    gc.collect()
    return f"imagereward:{root / 'ImageReward'}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clipscore", "aesthetic", "pickscore", "hpsv2", "imagereward"])
def test_full_size_models_load_score_and_pass_gradients(kind, tmp_path):
    import resource
    import time

    spec = _full_size_release(kind, tmp_path)
    start = time.perf_counter()
    model = load_standard(spec)
    loaded = time.perf_counter()
    assert model.image_size == 224
    images = torch.rand(2, 3, 512, 384, requires_grad=True)  # SD-sized, non-square
    scores = model(images, PROMPTS)
    scores.sum().backward()
    assert scores.shape == (2,) and torch.isfinite(scores).all() and images.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(images.detach(), PROMPTS)
    assert torch.isfinite(low).all()
    done = time.perf_counter()
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{kind}: {params:.0f}M params, load {loaded - start:.1f} s, score+backward+bf16 "
          f"{done - loaded:.1f} s, peak RSS {rss_gb:.1f} GB")
