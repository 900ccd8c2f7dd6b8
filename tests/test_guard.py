"""Reward hacking guards (refl/guard.py): held-out judges, lora_best selection, early stopping, resume;
the critic ensemble (reward/ensemble.py). Everything is built through the production factories."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from reward import evaluators as E

# Two cores shared with other jobs: one intra-op thread avoids OpenMP spin-waiting.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VALIDATION_PROMPTS = "train.validation_prompts=[a red square, a green circle]"


def _overrides(out, updates: int) -> list[str]:
    """A tiny ReFL run that validates (2 prompts x 2 images) and checkpoints after every update (not before
    the first: the scripted judges play one value per update; update 0 has its own test)."""
    return [f"train.output_dir={out}", "model.name=tiny", "reward.kind=contrast",
            f"train.max_updates={updates}",
            "train.batch_size=1", "train.gradient_accumulation=1", "train.lr=1e-2", "train.log_with=none",
            "train.gradient_checkpointing=false", "train.validate_every=1", "train.checkpoint_every=1",
            "train.checkpoints_keep=0", "train.validation_num_inference_steps=2", VALIDATION_PROMPTS,
            "train.validation_images_per_prompt=2", "step.num_inference_steps=3", "step.cut_range=[1,2]",
            "step.grad_scale=1.0", "train.validate_at_start=false"]


def _config(out, updates: int, *extra: str):
    from refl.config import ReflConfig
    from runkit.config import load_config

    return load_config(ReflConfig, None, _overrides(out, updates) + list(extra))


def contrast(images):
    w = images.shape[-1] // 2
    return (images[..., :w].mean(dim=(1, 2, 3)) - images[..., w:].mean(dim=(1, 2, 3))) * 10  # (B,)


class Script:
    """A held-out judge (evaluator kind "scripted") that plays `judge`, one value per validation, and a
    training reward whose value on the validation images (eval/reward) plays `reward`; in the ReFL step
    (with gradient) the reward is the differentiable contrast reward."""

    def __init__(self, judge: list[float], reward: list[float] | None = None, start: int = 0):
        self.judge, self.reward, self.n = judge, reward, start  # n: validations done so far

    def factory(self, argument: str, device: str):
        def score(images, prompts):
            value = self.judge[self.n]
            self.n += 1
            return np.full(len(images), value)

        return score

    def reward_fn(self, images, prompts):
        if torch.is_grad_enabled() or self.reward is None:
            return contrast(images)
        return torch.full((len(images),), float(self.reward[self.n]))  # validation: before the judges


@pytest.fixture
def scripted(monkeypatch):
    """Register a Script as the "scripted" evaluator kind (dropped from the registry afterwards)."""
    monkeypatch.setattr(E, "EVALUATORS", dict(E.EVALUATORS))

    def register(script: Script) -> Script:
        E.register_evaluator("scripted", script.factory, overwrite=True)
        return script

    return register


def _lora(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "pytorch_lora_weights.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def critic_dirs(tmp_path_factory):
    """Two different calibrated tiny critics saved as checkpoint folders."""
    from reward.model import CriticConfig, create_critic

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        critic = create_critic(CriticConfig(model_name="tiny-clip", training_mode="all"))
        critic.calibrate_(torch.randn(64) * 0.05 + 0.1 * seed)
        dirs.append(critic.save_pretrained(tmp_path_factory.mktemp(f"critic{seed}")))
    return dirs


# ----------------------------------------------------------------------------- selection and stopping
def test_lora_best_is_the_update_the_heldout_judge_liked_best(tmp_path, scripted):
    from refl.train import train

    scripted(Script([0.1, 0.5, 0.9, 0.3, 0.2]))
    out = tmp_path / "run"
    result = train(_config(out, 5, "train.select_by=scripted:judge"))
    assert result["best_update"] == 3 and result["best_score"] == 0.9 and result["stopped_early_at"] is None
    ckpts = out / "checkpoints"
    assert _same(_lora(out / "lora_best"), _lora(ckpts / "update-000003" / "lora"))
    assert _same(_lora(out / "lora"), _lora(ckpts / "update-000005" / "lora"))
    assert not _same(_lora(out / "lora_best"), _lora(out / "lora"))  # training moved the LoRA after update 3
    evals = [r for r in map(json.loads,
                            (out / "metrics.jsonl").read_text().splitlines()) if "eval/reward" in r]
    assert [r["update"] for r in evals] == [1, 2, 3, 4, 5]
    assert [r["eval/heldout/scripted:judge"] for r in evals] == [0.1, 0.5, 0.9, 0.3, 0.2]
    assert all(r["eval/diversity"] > 0 for r in evals)
    assert (out / "training_curve.png").is_file()
    state = json.loads((ckpts / "update-000005" / "state.json").read_text())
    assert state["best_update"] == 3 and state["best_score"] == 0.9


def test_validation_at_update_0_is_logged_and_can_keep_the_base(tmp_path, scripted):
    """The base (update 0, the LoRA a no-op) is validated first; when no update beats it, lora_best is the
    base."""
    from refl.train import train

    scripted(Script([0.9, 0.5, 0.3]))
    out = tmp_path / "run"
    result = train(_config(out, 2, "train.select_by=scripted:judge", "train.validate_at_start=true"))
    evals = [r for r in map(json.loads,
                            (out / "metrics.jsonl").read_text().splitlines()) if "eval/reward" in r]
    assert [r["update"] for r in evals] == [0, 1, 2]
    assert [r["eval/heldout/scripted:judge"] for r in evals] == [0.9, 0.5, 0.3]
    assert (out / "samples" / "update-000000.png").is_file()
    assert result["best_update"] == 0 and result["best_score"] == 0.9
    up = [k for k in _lora(out / "lora_best") if k.endswith("lora.up.weight")]  # B of each adapter
    # the base: every B still zero
    assert up and all(_lora(out / "lora_best")[k].abs().sum() == 0 for k in up)
    assert any(_lora(out / "lora")[k].abs().sum() > 0 for k in up)


def test_drops_count_only_while_the_reward_rises():
    from refl import guard
    from refl.train import TrainState

    def run(judge, reward):
        state, counts = TrainState(), []
        for u, (s, r) in enumerate(zip(judge, reward), start=1):
            state.update = u
            guard.track(state, s, r)
            counts.append(state.drops)
        return state, counts

    state, counts = run([0.1, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1], [0, 1, 2, 3, 4, 5, 6])
    assert counts == [0, 0, 1, 2, 0, 1, 2]  # a judge that holds (0.3 -> 0.3) is no drop
    assert (state.best_score, state.best_update) == (0.5, 2)
    _, counts = run([0.5, 0.4, 0.3, 0.2, 0.1], [0, 1, 1, 2, 3])
    assert counts == [0, 1, 0, 1, 2]  # the reward held at the 3rd: both degrading is not hacking


def test_stop_after_k_drops_while_the_reward_rises(tmp_path, scripted):
    from refl.train import train

    judge = [0.1, 0.5, 0.4, 0.3, 0.2, 0.1]
    script = scripted(Script(judge, reward=[0, 1, 2, 3, 4, 5]))
    out = tmp_path / "stops"
    args = ("train.select_by=scripted:judge", "train.stop_after_drops=2")
    result = train(_config(out, 6, *args), reward_fn=script.reward_fn)
    assert result["stopped_early_at"] == 4 and result["updates"] == 4 and result["best_update"] == 2
    assert json.loads((out / "result.json").read_text())["stopped_early_at"] == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "update-000004"
    assert json.loads((out / "checkpoints" / "update-000004"
                       / "state.json").read_text())["stopped_early_at"] == 4
    assert _same(_lora(out / "lora"), _lora(out / "checkpoints" / "update-000004" / "lora"))
    assert _same(_lora(out / "lora_best"), _lora(out / "checkpoints" / "update-000002" / "lora"))

    script = scripted(Script(judge, reward=[0, 1, 1, 1, 1, 1]))  # the judge falls, the reward does not rise
    result = train(_config(tmp_path / "goes_on", 6, *args), reward_fn=script.reward_fn)
    assert result["stopped_early_at"] is None and result["updates"] == 6


def test_resume_keeps_the_best_so_far_and_the_drop_count(tmp_path, scripted):
    from refl.train import train

    judge, reward = [0.1, 0.9, 0.5, 0.3, 0.2, 0.1], [0, 1, 2, 3, 4, 5]
    args = ("train.select_by=scripted:judge", "train.stop_after_drops=3")
    script = scripted(Script(judge, reward))
    full = train(_config(tmp_path / "full", 6, *args), reward_fn=script.reward_fn)
    assert full["stopped_early_at"] == 5 and full["best_update"] == 2

    # Crash in the 4th validation (update 4): checkpoint 3 holds one drop, best at 2.
    crash = Script(judge[:3], reward)
    scripted(crash)
    with pytest.raises(IndexError):
        train(_config(tmp_path / "resumed", 6, *args), reward_fn=crash.reward_fn)
    state3 = json.loads((tmp_path / "resumed" / "checkpoints" / "update-000003" / "state.json").read_text())
    from refl.compute import COMPUTE_FIELDS

    assert {k: v for k, v in state3.items() if k not in COMPUTE_FIELDS} == {
        "update": 3, "best_score": 0.9, "best_update": 2, "drops": 1, "prev_score": 0.5, "prev_reward": 2.0,
        "stopped_early_at": None, "validated": 3}
    # Update 4's checkpoint was written before the validation that crashed; the resumed run validates it
    # first.
    state4 = json.loads((tmp_path / "resumed" / "checkpoints" / "update-000004" / "state.json").read_text())
    assert state4["update"] == 4 and state4["validated"] == 3
    script = scripted(Script(judge, reward, start=3))  # the judge and reward go on at the 4th validation
    resumed = train(_config(tmp_path / "resumed", 6, *args, "train.resume=latest"),
                    reward_fn=script.reward_fn)
    assert resumed["stopped_early_at"] == 5 and resumed["best_update"] == 2
    state = [json.loads((tmp_path / run / "checkpoints" / "update-000005" / "state.json").read_text())
             for run in ("full", "resumed")]
    # the same state (what it spent too, but for the seconds: the counts carry on from the checkpoint)
    same = [{k: v for k, v in st.items() if not k.startswith("seconds_")} for st in state]
    assert same[0] == same[1] and state[0]["stopped_early_at"] == 5
    full_best, resumed_best = (_lora(tmp_path / "full" / "lora_best"),
                               _lora(tmp_path / "resumed" / "lora_best"))
    assert full_best.keys() == resumed_best.keys()
    assert max((full_best[k] - resumed_best[k]).abs().max().item() for k in full_best) < 1e-6


# ----------------------------------------------------------------------------- config
def test_guard_config_errors_and_warnings(tmp_path, caplog):
    from refl import guard
    from refl.config import ReflConfig
    from runkit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="validation_prompts is empty"):
        load_config(ReflConfig, None, ["train.select_by=clip:tiny-clip", "train.validation_prompts=[]"])
    with pytest.raises(ConfigError, match="needs train.select_by"):
        load_config(ReflConfig, None, ["train.stop_after_drops=2"])
    # A spec that ends in ':' is a YAML mapping unless quoted, as anywhere in --set.
    cfg = load_config(ReflConfig, None,
                      ['train.select_by="oracle:"', 'train.heldout_evaluators=[clip:x, "oracle:"]',
                                         "train.stop_after_drops=3", "train.max_updates=10",
                       "train.validate_every=5"])
    assert guard.judge_specs(cfg.train) == ["clip:x", "oracle:"]
    assert guard.count_validations(cfg.train) == 3  # updates 0, 5, 10
    with caplog.at_level("WARNING", logger="refl.guard"):
        guard.warn_if_too_few_validations(cfg.train)
    assert "can never stop this run" in caplog.text
    # reward.critic: one checkpoint or a list of them (a YAML list on the command line)
    assert load_config(ReflConfig, None, ["reward.critic=a/b"]).reward.critic == "a/b"
    assert load_config(ReflConfig, None, ["reward.critic=[a, b, c]"]).reward.critic == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="ensemble_penalty"):
        load_config(ReflConfig, None, ["reward.ensemble_penalty=-1"])


# ----------------------------------------------------------------------------- the ensemble
def test_ensemble_of_identical_members_is_the_single_critic(critic_dirs):
    from refl.config import RewardSourceConfig
    from refl.rewards import build_reward
    from reward.ensemble import CriticEnsemble

    images = torch.rand(3, 3, 16, 16)
    prompts = ["a red square", "a green circle", "a cat"]
    single = build_reward(RewardSourceConfig(kind="critic", critic=str(critic_dirs[0])), "cpu")
    for penalty in (0.0, 2.5):
        ensemble = build_reward(RewardSourceConfig(kind="critic", critic=[str(critic_dirs[0])] * 3,
                                             ensemble_penalty=penalty), "cpu", gradient_checkpointing=True)
        assert isinstance(ensemble, CriticEnsemble)
        assert all(not p.requires_grad for p in ensemble.parameters())
        assert torch.equal(ensemble(images, prompts), single(images, prompts))
        assert torch.equal(ensemble.last_terms["critic_std"], torch.zeros(3))
        # With gradient (open_clip's attention takes another kernel when the input needs grad, so compare
        # with the single critic on the same footing): still equal, and the std's gradient is 0, not NaN.
        x, y = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
        got, expected = ensemble(x, prompts), single(y, prompts)
        assert torch.equal(got, expected)
        got.sum().backward()
        expected.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        torch.testing.assert_close(x.grad, y.grad)


def test_ensemble_of_different_members_is_mean_minus_k_std(critic_dirs):
    import reward
    from refl.config import RewardSourceConfig
    from refl.rewards import build_reward

    images = torch.rand(4, 3, 16, 16)
    prompts = ["a red square", "a green circle", "a cat", "a dog"]
    paths = [str(d) for d in critic_dirs]
    ensemble = build_reward(RewardSourceConfig(kind="critic", critic=paths, ensemble_penalty=1.5), "cpu",
                            dtype=torch.float32)
    got = ensemble(images, prompts)
    with torch.no_grad():
        scores = torch.stack([reward.load(p)(images, prompts) for p in paths])  # (2, B)
    expected = scores.mean(0) - 1.5 * scores.std(0, unbiased=False)
    assert scores.std(0).min() > 1e-3  # the members do disagree
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ensemble.last_terms["critic_1"], scores[1], rtol=0, atol=0)
    # ... and as a held-out judge spec
    judge = E.create_evaluator(f"ensemble:{paths[0]},{paths[1]},penalty=1.5")
    from refl.sampling import to_uint8

    pixels = to_uint8(images)
    direct = ensemble(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255, prompts)
    np.testing.assert_allclose(judge(pixels, prompts), direct.detach().double().numpy(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bf16, all together
def test_bf16_run_with_judges_and_ensemble_logs_finite_numbers(tmp_path, critic_dirs, scripted):
    from refl.train import train

    scripted(Script([0.1, 0.3, 0.2]))
    paths = ",".join(str(d) for d in critic_dirs)
    out = tmp_path / "bf16"
    cfg = _config(out, 3, "train.mixed_precision=bf16", "reward.kind=critic", f"reward.critic=[{paths}]",
                  "reward.ensemble_penalty=1.0", "train.heldout_evaluators=[clip:tiny-clip, scripted:judge]",
                  f"train.select_by=ensemble:{paths},penalty=1", "train.stop_after_drops=1",
                  "train.log_with=tensorboard")
    result = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trains = [r for r in records if "train/reward" in r]
    evals = [r for r in records if "eval/reward" in r]
    assert len(trains) == len(evals) == result["updates"]
    for key in ("train/reward/critic_0", "train/reward/critic_1", "train/reward/critic_std"):
        assert all(math.isfinite(r[key]) for r in trains), key
    assert all(r["train/reward/critic_std"] > 0 for r in trains)
    for key in ("eval/heldout/clip:tiny-clip", "eval/heldout/scripted:judge",
                f"eval/heldout/ensemble:{paths},penalty=1", "eval/diversity"):
        assert all(math.isfinite(r[key]) for r in evals), key
    assert (out / "lora_best" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "training_curve.png").is_file() and any((out / "tb").iterdir())


def test_curve_marks_the_best_update(tmp_path):
    from refl.plots import plot_curve

    rows = [{"update": u, "train/reward": 0.1 * u, "train/loss": 1 - 0.1 * u} for u in range(1, 5)]
    rows += [{"update": u, "eval/reward": 0.1 * u, "eval/heldout/clip:x": [1, 3, 2, 1][u - 1],
              "eval/heldout/oracle:": 0.5, "eval/diversity": 0.3} for u in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.png", best_update=2)
    assert png.is_file() and png.stat().st_size > 1000


def test_two_processes_stop_together(tmp_path):
    """Validation and its judges run on the main process only; the stop must reach the other rank too
    (otherwise it waits forever in the next update's all-reduce)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true"}
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "ddp"
    overrides = [o for o in _overrides(out, 6) if not o.startswith("train.output_dir")]
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no",
           "--dynamo_backend", "no", "tests/guard_multiproc_worker.py", str(out), *overrides,
           "train.select_by=scripted:judge", "train.stop_after_drops=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"updates": 4, "stopped_early_at": 4}
    state = json.loads((out / "checkpoints" / "update-000004" / "state.json").read_text())
    assert state["best_update"] == 2 and state["drops"] == 2
