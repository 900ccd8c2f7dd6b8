"""Run by the two-process tests under `accelerate launch --multi_gpu --num_processes 2` on the CPU: train
with one of the LoRA trainers (argv[1]: refl or preference), then dump each rank's LoRA."""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from refl.lora import lora_state
from runkit.config import load_config

torch.set_num_threads(1)


def main() -> None:
    trainer, out = sys.argv[1], Path(sys.argv[2])
    if trainer == "refl":
        from refl.train import ReflConfig as Config
        from refl.train import train
    else:
        from preference.config import PreferenceConfig as Config
        from preference.train import train
    cfg = load_config(Config, None, [f"train.output_dir={out}", *sys.argv[3:]])
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
