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
