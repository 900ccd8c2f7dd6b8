"""Run by test_guard.py under a 2-process CPU launch: a scripted judge falls while the validation reward
rises, so the main process decides to stop; each rank writes what it did, to show they stopped together."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from refl.train import ReflConfig, train
from reward.evaluators import register_evaluator
from runkit.config import load_config

torch.set_num_threads(1)
JUDGE = [0.1, 0.5, 0.4, 0.3, 0.2, 0.1]  # one value per validation (main process only)
REWARD = [0, 1, 2, 3, 4, 5]
done = {"n": 0}


def scripted(argument, device):
    def score(images, prompts):
        done["n"] += 1
        return np.full(len(images), JUDGE[done["n"] - 1])

    return score


def reward_fn(images, prompts):
    if torch.is_grad_enabled():  # the ReFL step: the differentiable contrast reward
        w = images.shape[-1] // 2
        return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10
    return torch.full((len(images),), float(REWARD[done["n"]]))  # validation, before the judge


def main() -> None:
    out = Path(sys.argv[1])
    register_evaluator("scripted", scripted)
    cfg = load_config(ReflConfig, None, [f"train.output_dir={out}", *sys.argv[2:]])
    result = train(cfg, reward_fn=reward_fn)
    rank = int(os.environ["RANK"])
    (out / f"rank_{rank}.json").write_text(json.dumps({"updates": result["updates"],
                                                       "stopped_early_at": result["stopped_early_at"]}))


if __name__ == "__main__":
    main()
