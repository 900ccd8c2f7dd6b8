"""Diffusion-DPO and Diffusion-KTO under two processes (accelerate's MULTI_CPU mode with gloo): the LoRA
gradients are averaged across processes and KTO's reference point is a mean over every process's batch, so
the replicas must stay bit-identical while each process reads its own share of the feedback."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from helpers.training import lora_file
from safetensors.torch import load_file

from reward.synthetic import make_colour_pairs


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_two_process_preference_tuning_keeps_replicas_identical(method, base_dir, tmp_path):
    pairs = make_colour_pairs(tmp_path / "colour", n_pairs=8, size=16, seed=0)
    data = pairs
    if method == "kto":
        table = pd.read_parquet(pairs)
        data = tmp_path / "colour" / "labels.parquet"
        pd.DataFrame([{"prompt": p, "image": img, "label": y}
                      for p, pos, neg in table[["prompt", "pos_path", "neg_path"]].itertuples(index=False)
                      for img, y in ((pos, 1.0), (neg, 0.0))]).to_parquet(data)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "ddp"
    overrides = [f"model.name={base_dir}", f"method={method}", f"data.train={data}", "train.max_updates=3",
                 "train.batch_size=2", "train.lr=1e-2", "train.checkpoint_every=2", "train.log_with=none",
                 "train.validation_prompts=[]", "train.heldout_evaluators=[]", "beta=50", "lora.dropout=0.0"]
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "tests/helpers/ddp_train_lora.py",
           "preference", str(out), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(str(out / "replica_0.safetensors"))
    r1 = load_file(str(out / "replica_1.safetensors"))
    assert r0.keys() == r1.keys() and len(r0) > 0
    assert max((r0[k] - r1[k]).abs().max().item() for k in r0) == 0.0
    # The processes read different feedback, so identical replicas mean the gradients were averaged; and the
    # last update moved the weights past the update-2 checkpoint.
    start = lora_file(out / "checkpoints" / "update-000002")
    assert max((r0[k] - start[k]).abs().max().item() for k in r0) > 0
