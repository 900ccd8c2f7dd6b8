"""Run by test_refl_train.py under `accelerate launch --num_processes 2 --cpu`: train, then dump each rank's
LoRA."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from refl.lora import lora_state
from refl.train import ReflConfig, train
from runkit.config import load_config

torch.set_num_threads(1)


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(ReflConfig, None, [f"train.output_dir={out}", *sys.argv[2:]])
    captured = {}
    import refl.lora_training as lt

    real_add_lora = lt.add_lora

    def add_lora_and_keep(components, settings, seed=0):  # keep a handle on this rank's components
        captured["components"] = components
        return real_add_lora(components, settings, seed=seed)

    lt.add_lora = add_lora_and_keep
    train(cfg)
    rank = int(os.environ["RANK"])  # end_training() has already torn the process group down
    save_file(lora_state(captured["components"]), str(out / f"replica_{rank}.safetensors"))


if __name__ == "__main__":
    main()
