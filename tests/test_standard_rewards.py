"""reward/standard.py: the standard reward models, built tiny, saved as released, checked against upstream.

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


# ----------------------------------------------------------------------------- tiny weights in upstream layouts
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
    torch.save({"state_dict": {k: v.half() for k, v in clip.state_dict().items()}}, hps / "HPS_v2_compressed.pt")
    torch.manual_seed(1)
    mlp = ScoreMLP(16)
    torch.save(mlp.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")  # a plain state dict
    hf = _tiny_hf_clip()
    hf.save_pretrained(root / "pickscore")
    return {
        "root": root, "clip": clip, "mlp": mlp, "hf": hf,
        "specs": {
            "clipscore": f"clipscore:tiny-clip:{root / 'tiny_openclip.pt'}",
            "aesthetic": f"aesthetic:{root},backbone=tiny-clip:{root / 'tiny_openclip.pt'}",
            "pickscore": f"pickscore:{root / 'pickscore'}",
            "hpsv2": f"hpsv2:{hps},model=tiny-clip",
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
    with pytest.raises(WeightsError, match=rf"{tmp_path}.*missing.*visual.proj.*unexpected.*visual.NOPE.*state_dict"):
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
    state = {k.replace("visual_projection", "image_projection"): v for k, v in weights["hf"].state_dict().items()}
    torch.save(state, hf_dir / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"pickscore: .*hf does not match.*visual_projection"):
        load_standard(f"pickscore:{hf_dir}")


def test_hub_ids_honour_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"HPS_v2_compressed.pt from the hub repository xswu/HPSv2.*local path"):
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
@pytest.mark.parametrize("kind", ["clipscore", "aesthetic", "pickscore", "hpsv2"])
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


@pytest.mark.parametrize("kind", ["clipscore", "aesthetic", "pickscore", "hpsv2"])
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
# 10 x 13 -> 16 x 20.8, truncated to 20 by both (rounding would give 21).
SHAPES = [(45, 54), (10, 12), (54, 45), (10, 13)]


def _pil_tolerance(std):
    # PIL resizes in 8 bits: its output is rounded to 1/255 (0.5/255 error) and its fixed-point filter
    # adds a little; measured against torch's antialiased bicubic: max 1.1/255, mean 0.3/255 per pixel.
    return 1.5 / 255 / min(std), 0.5 / 255 / min(std)


def _close_to_pil(ours, ref, std):
    max_tol, mean_tol = _pil_tolerance(std)
    diff = (ours - ref).abs()
    assert ours.shape == ref.shape
    assert diff.max().item() < max_tol and diff.mean().item() < mean_tol, (diff.max().item(), diff.mean().item())


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
