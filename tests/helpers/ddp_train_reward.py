"""Run under `accelerate launch --num_processes 2 --cpu`: trains a critic and dumps this rank's weights."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from reward.config import RewardConfig
from reward.train import train
from runkit.config import load_config
from runkit.logs import setup_logging

if __name__ == "__main__":
    setup_logging()
    out = Path(sys.argv[1])
    cfg = load_config(RewardConfig, None, sys.argv[2:])
    result = train(cfg)
    rank = int(os.environ.get("RANK", "0"))
    state = {k: v.detach().contiguous() for k, v in result["critic"].state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
