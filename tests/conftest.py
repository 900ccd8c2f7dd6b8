import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def colour_pairs(tmp_path_factory):
    """A learnable pairs set (train + val from different seeds) at 16 px, shared by the reward tests."""
    from reward.synthetic import make_colour_pairs

    root = tmp_path_factory.mktemp("colour_pairs")
    return {
        "train": make_colour_pairs(root / "train", n_pairs=384, size=16, seed=0),
        "val": make_colour_pairs(root / "val", n_pairs=96, size=16, seed=1),
    }


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """The tiny preset saved as a diffusers directory, the base model of the loading, LoRA and generate
    tests (read only)."""
    from refl.components import load_components, save_pipeline

    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    save_pipeline(load_components("tiny"), path)
    return path


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """The quick demo, run once per session: round 0 of the studies and the flywheel (tests/test_demo.py,
    tests/test_flywheel.py)."""
    from toyworld.cli import demo_main

    out = tmp_path_factory.mktemp("demo")
    assert demo_main(["--out", str(out), "--quick"]) == 0
    return out


# The toy flow model's pre-training at a size of seconds: a 1-block transformer after 3 updates (read only).
TINY_FLOW = ["--set", "n_images=128", "--set", "n_layers=1", "--set", "n_heads=2", "--set",
             "transformer_updates=3", "--set", "transformer_batch_size=16", "--set", "transformer_minutes=0",
             "--set", "n_eval_prompts=4", "--set", "eval_num_inference_steps=2"]


@pytest.fixture(scope="session")
def toy_flow_dir(tmp_path_factory):
    """A toy-flow folder made by `social-refl-pretrain-toy-flow` at TINY_FLOW's size: the pre-training
    script's smoke run and the flow demo's base model."""
    from toyworld.cli import pretrain_flow_main

    out = tmp_path_factory.mktemp("flow") / "toy-flow"
    assert pretrain_flow_main(["--out", str(out), *TINY_FLOW]) == 0
    return out


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses a second `mixed_precision` in the same process
    (a bf16 training test after an fp32 one fails with "AcceleratorState has already been initialized");
    clear it before and after every test, as accelerate's own tests do."""
    import sys

    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state(reset_partial_state=True)
