import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import reward
from reward.config import RewardConfig
from reward.data import load_pairs
from reward.evaluate import evaluate_pairs
from reward.model import CriticConfig, create_critic
from reward.train import train
from runkit.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(colour_pairs, out, *extra):
    return load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", "model.training_mode=all",
        f"data.train={colour_pairs['train']}", f"data.val={colour_pairs['val']}",
        "train.lr=2e-3", "train.batch_size=32", "train.log_every=2", f"train.output_dir={out}", *extra,
    ])


def test_training_raises_pairwise_accuracy(colour_pairs, tmp_path):
    val = load_pairs(colour_pairs["val"])
    torch.manual_seed(0)
    before = evaluate_pairs(create_critic(CriticConfig(model_name="tiny-clip")), val)["pairwise_accuracy"]
    result = train(_cfg(colour_pairs, tmp_path, "train.epochs=4"))
    after = result["eval"]["pairwise_accuracy"]
    assert 0.3 <= before <= 0.7, before
    assert after >= 0.8, (before, after)
    # The exported critic is what validation sees, calibrated to mean 0 / std 1 on held-out images.
    exported = reward.load(tmp_path / "critic")
    assert evaluate_pairs(exported, val)["pairwise_accuracy"] == pytest.approx(after, abs=1e-6)
    assert exported.score_scale.item() != 1.0
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "metrics.json").is_file()
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in logged) and any("eval/pairwise_accuracy" in r for r in logged)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_resume_reproduces_the_uninterrupted_run(colour_pairs, tmp_path):
    # 384 pairs / batch 32 = 12 steps per epoch; the checkpoint at step 8 sits mid-epoch.
    extra = ["train.max_updates=16", "train.checkpoint_every=8", "train.checkpoints_keep=0",
             "train.validate_every=100",
             "train.lr_schedule=cosine", "train.warmup_updates=3", "loss.name=pairwise"]
    full = train(_cfg(colour_pairs, tmp_path / "full", *extra))["critic"]
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "update-000008",
                    resumed_dir / "checkpoints" / "update-000008")
    resumed = train(_cfg(colour_pairs, resumed_dir, *extra, "train.resume=latest"))
    assert resumed["update"] == 16
    diff = max((a - b).abs().max().item() for a, b in zip(full.state_dict().values(),
                                                          resumed["critic"].state_dict().values()))
    assert diff < 1e-6, diff


def test_nan_loss_stops_with_a_clear_message(colour_pairs, tmp_path):
    with pytest.raises(FloatingPointError, match="no update was applied"):
        train(_cfg(colour_pairs, tmp_path, "train.max_updates=2", "train.lr=1e30", "loss.name=pairwise",
                   "loss.init_logit_scale=1e30"))


def test_script_reports_bad_config_key(tmp_path):
    from reward.cli import train_main

    assert train_main(["--set", "train.bogus=1"]) == 2


def _launch_two_processes(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """Train a critic in 2 DDP processes (accelerate's launcher; with ACCELERATE_USE_CPU each is a gloo rank).
    The ranks import the checkout under test (PYTHONPATH), as the ReFL multi-process tests do, not an
    installed copy, and each dumps its replica's weights to tmp_path/rank<k>.safetensors."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port),
           str(ROOT / "tests/helpers/ddp_train_reward.py"), str(tmp_path), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _replicas(tmp_path) -> tuple[dict, dict]:
    return load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))


def test_two_process_ddp_keeps_replicas_identical(colour_pairs, tmp_path):
    proc = _launch_two_processes(
        tmp_path, "model.model_name=tiny-clip",
        "model.training_mode=visual_upper_layers_textual_upper_layers",
        f"data.train={colour_pairs['train']}", f"data.val={colour_pairs['val']}", "loss.name=pairwise",
        "train.max_updates=4", "train.batch_size=16", "train.lr=1e-3", "train.calibrate=false",
        "train.keep_best=true", "train.validate_every=2", f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _replicas(tmp_path)  # keep_best: every process loads the main process's choice
    start = create_critic(CriticConfig(model_name="tiny-clip")).state_dict()
    moved = 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
        moved += int(not torch.equal(a[k], start[k]) and "resblocks.2" in k)
    assert moved > 0  # training really changed the replicas (same seed gives the same start)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["update"] == 4 and metrics["selected_update"] in (2, 4)
    assert "MULTI_CPU" in proc.stderr and "2 processes" in proc.stderr


def _pairs_with_a_bad_row_group(path: Path, n_groups: int, bad_group: int, group: int = 4) -> Path:
    """Pick-a-Pic rows (no ties) in row groups of `group`; every row of group `bad_group` has an unreadable
    preferred image. With batch_size == group and shuffle_row_groups=1 each micro-batch is one row group, so
    one micro-batch is all bad."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers.pairs import encoded_image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_groups * group):
        rows.append({"caption": f"prompt {i}", "jpg_0": encoded_image(rng, 16),
                     "jpg_1": encoded_image(rng, 16), "label_0": float(i % 2), "label_1": float(1 - i % 2)})
        if i // group == bad_group:
            rows[-1]["jpg_0"] = b"truncated"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=group)
    return path


def test_a_micro_batch_of_bad_rows_is_skipped_and_counted_in_one_process(tmp_path):
    pairs = _pairs_with_a_bad_row_group(tmp_path / "pairs.parquet", n_groups=4, bad_group=2)
    cfg = load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", f"data.train={pairs}", "data.val_fraction=0", "data.on_bad_row=skip",
        "data.shuffle_row_groups=1", "loss.name=pairwise", "train.batch_size=4", "train.max_updates=4",
        "train.lr=1e-3", f"train.output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    # 3 good micro-batches per epoch: the 4th update comes from the second epoch, which may meet the bad
    # group again before it.
    assert result["update"] == 4
    assert result["bad_rows_skipped"] in (4, 8)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for row in history for k, v in row.items() if k.startswith("train/"))


def test_a_set_whose_every_image_is_bad_stops_after_one_epoch(tmp_path, capsys):
    """Labels pass the index, but no image decodes: one epoch, then exit 2 saying nothing can be trained
    (skipping whole micro-batches would otherwise never reach an update)."""
    from reward.cli import train_main

    pairs = _pairs_with_a_bad_row_group(tmp_path / "pairs.parquet", n_groups=1, bad_group=0)
    assert train_main(["--set", "model.model_name=tiny-clip", "--set", f"data.train={pairs}",
                       "--set", "data.val_fraction=0", "--set", "data.on_bad_row=skip",
                       "--set", "train.batch_size=2", "--set", "train.max_updates=3",
                       "--set", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "every training row met in epoch 0 was bad (4 skipped" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "critic").exists()


def test_a_micro_batch_of_bad_rows_on_one_ddp_process_keeps_the_processes_in_step(tmp_path):
    """One process's micro-batch is all bad (skip): it takes part in the update with a zero gradient
    instead of raising or leaving the other process waiting; the replicas stay identical."""
    pairs = _pairs_with_a_bad_row_group(tmp_path / "pairs.parquet", n_groups=4, bad_group=1)
    proc = _launch_two_processes(
        tmp_path, "model.model_name=tiny-clip", f"data.train={pairs}", "data.val_fraction=0",
        "data.on_bad_row=skip", "data.shuffle_row_groups=1", "loss.name=pairwise", "train.batch_size=4",
        "train.max_updates=2", "train.lr=1e-3", "train.calibrate=false",
        f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _replicas(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 2 row groups per process, 2 micro-batches each: the bad group is met exactly once.
    assert metrics["update"] == 2 and metrics["bad_rows_skipped"] == 4
    assert "the whole micro-batch" in proc.stderr


def test_finetuning_a_calibrated_critic_on_streamed_shards_in_bf16(tmp_path):
    """A calibrated critic directory fine-tuned in bf16 with gradient checkpointing on a shard folder
    (held-out prompts by hash): the new calibration is fitted on raw cosines, so its scores get std 1."""
    from helpers.pairs import pickapic_rows, write_shards

    from reward.data import PairShards, prompt_in_val
    from reward.evaluate import score_pairs

    torch.manual_seed(0)
    start = create_critic(CriticConfig(model_name="tiny-clip"))
    start.calibrate_(torch.tensor([0.0, 0.05, 0.1]))  # scale 20: far from 1, so a wrong fit shows
    start.save_pretrained(tmp_path / "start")
    rows = pickapic_rows(120, size=12)
    bad = next(i for i in range(120) if not prompt_in_val(f"prompt {i}", 0.25))
    rows[bad]["jpg_0"] = b"truncated"  # met in the training share: skipped and counted
    write_shards(tmp_path / "data", rows, n_shards=3, row_group=10)
    cfg = load_config(RewardConfig, None, [
        "model.model_name=tiny-clip", f"model.pretrained={tmp_path / 'start'}",
        f"data.train={tmp_path / 'data'}",
        "data.val_fraction=0.25", "data.num_workers=1", "data.on_bad_row=skip", "loss.name=pickscore",
        "train.batch_size=16", "train.epochs=1", "train.mixed_precision=bf16",
        "train.gradient_checkpointing=true", "train.lr=1e-3", f"train.output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert result["bad_rows_skipped"] == 1  # one epoch: every training pair seen once
    tuned = reward.load(tmp_path / "run" / "critic")
    moved = [k for k, v in tuned.state_dict().items() if "resblocks.2" in k
             and not torch.equal(v, start.state_dict()[k])]
    assert moved  # the run trained
    val = PairShards(tmp_path / "data", tuned.image_size, tie_policy="keep", split="val", val_fraction=0.25)
    train_part = PairShards(tmp_path / "data", tuned.image_size, tie_policy="keep", split="train",
                            val_fraction=0.25, on_bad_row="skip")
    assert len(val) + len(train_part) == 120 and 10 < len(val) < 50
    assert result["update"] == -(-len(train_part) // 16)
    train_prompts = {train_part[i].get("prompt") for i in range(len(train_part))}
    assert not {val[i]["prompt"] for i in range(len(val))} & train_prompts
    s_pos, s_neg = score_pairs(tuned, val)
    scores = np.concatenate([s_pos, s_neg])
    assert scores.std(ddof=1) == pytest.approx(1.0, abs=1e-3) and abs(scores.mean()) < 1e-3
    assert tuned.score_scale.item() != pytest.approx(start.score_scale.item(), rel=0.1)


@pytest.mark.slow
def test_paper_vitl14_critic_trains_in_bf16_on_streamed_shards(tmp_path):
    """configs/reward_social_vitl14.yaml (ViT-L-14 at 224 px, the paper's trained slices), random
    weights, a few bf16 steps with gradient checkpointing on a Pick-a-Pic-style JPEG shard set read by
    2 workers. Run by hand: `pytest -m slow -k vitl14` (docs/critic.md has the measured time and RSS)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg(w, h):
        buf = io.BytesIO()
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    data = tmp_path / "pickapic" / "data"
    data.mkdir(parents=True)
    for k in range(2):
        rows = [{"caption": f"a picture number {k}-{i}", "jpg_0": jpeg(320, 256), "jpg_1": jpeg(256, 384),
                 "label_0": float(i % 2), "label_1": float(1 - i % 2)} for i in range(12)]
        pq.write_table(pa.Table.from_pylist(rows), data / f"train-{k:05d}-of-00002.parquet", row_group_size=4)
    cfg = load_config(RewardConfig, ROOT / "configs/reward_social_vitl14.yaml", [
        "model.pretrained=null", f"data.train={data}", "data.val=", "data.val_fraction=0.25",
        "data.num_workers=2", "train.batch_size=2", "train.max_updates=2",
        "train.gradient_checkpointing=true", f"train.output_dir={tmp_path / 'run'}"])
    assert cfg.model.model_name == "ViT-L-14" and cfg.train.mixed_precision == "bf16"
    result = train(cfg)
    assert result["update"] == 2 and result["bad_rows_skipped"] == 0
    critic = result["critic"]
    assert critic.image_size == 224
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)  # the run's own start: train() seeds the same way before building the critic
    start = create_critic(CriticConfig(model_name="ViT-L-14", pretrained=None)).state_dict()
    moved = [k for k, v in critic.state_dict().items() if not torch.equal(v, start[k])]
    assert any("visual.transformer.resblocks.23." in k for k in moved)
    assert not any("visual.transformer.resblocks.0." in k for k in moved)  # frozen lower layers stay put
    assert np.isfinite(result["history"][-1]["pairwise_accuracy"])


def test_keep_best_makes_the_best_validation_the_final_critic(colour_pairs, tmp_path):
    """train.keep_best: the final critic is the one of the best held-out accuracy (earliest on a tie), and a
    checkpoint written at an update knows that update's validation (so a resume from it chooses alike)."""
    import json as json_module

    from runkit.checkpoints import checkpoint_dirs

    result = train(_cfg(colour_pairs, tmp_path, "train.max_updates=12", "train.validate_every=2",
                        "train.checkpoint_every=4", "train.checkpoints_keep=0", "train.lr=3e-2",
                        "train.calibrate=false", "train.keep_best=true"))
    history = result["history"]

    def best_of(rows):
        return max(rows, key=lambda h: (h["pairwise_accuracy"], -h["update"]))

    best = best_of(history)
    assert result["selected_update"] == best["update"] and result["eval"]["update"] == best["update"]
    accuracies = {h["pairwise_accuracy"] for h in history}
    assert len(accuracies) > 1  # the choice mattered: validations differ (lr high enough to wander)
    val = load_pairs(colour_pairs["val"])
    for critic in (result["critic"], reward.load(tmp_path / "critic")):  # in memory and as saved
        assert evaluate_pairs(critic, val)["pairwise_accuracy"] == pytest.approx(best["pairwise_accuracy"])
    for ckpt in checkpoint_dirs(tmp_path):
        state = json_module.loads((ckpt / "state.json").read_text())
        so_far = [h for h in history if h["update"] <= state["update"]]
        assert state["best_update"] == best_of(so_far)["update"]


def test_keep_best_needs_held_out_pairs(colour_pairs, tmp_path):
    from runkit.config import ConfigError

    with pytest.raises(ConfigError, match="keep_best"):
        load_config(RewardConfig, None, [f"data.train={colour_pairs['train']}", "data.val_fraction=0",
                                         "train.keep_best=true"])
