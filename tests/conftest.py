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


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses a second mixed-precision setting in the
    same process ("restart your runtime"); tests that switch precision start and end with a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
