import dataclasses
import typing
from typing import ClassVar

import pytest
import torch

from reward.config import RewardConfig
from runkit.config import ConfigError, load_config, save_config


def test_yaml_and_overrides_apply_in_order(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 1.0e-4\n  batch_size: 8\nmodel:\n  model_name: tiny-clip\n")
    cfg = load_config(RewardConfig, f, ["train.lr=5e-5", "loss.name=pairwise", "data.check_images=false"])
    assert cfg.train.lr == pytest.approx(5e-5)
    assert cfg.train.batch_size == 8
    assert cfg.model.model_name == "tiny-clip"
    assert cfg.loss.name == "pairwise"
    assert cfg.data.check_images is False


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"train\.lrr") as err:
        load_config(RewardConfig, f)
    assert str(f) in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.nope"):
        load_config(RewardConfig, None, ["model.nope=1"])


def test_wrong_type_and_bad_choice_are_refused():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(RewardConfig, None, ["train.batch_size=lots"])
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(RewardConfig, None, ["loss.name=hinge"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(RewardConfig, None, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RewardConfig, None, ["train.epochs=3", "train.output_dir=somewhere"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(RewardConfig, path)
    assert again == cfg


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("reward_*.yaml"))
    assert files, "no reward configs shipped"
    for f in files:
        load_config(RewardConfig, f)


# --------------------------------------------------------------------------- one vocabulary for both trainers
def test_both_trainers_share_the_training_vocabulary():
    from refl.config import ReflConfig, ReflTrainConfig
    from reward.config import CriticTrainConfig
    from runkit.config import TrainSettings

    shared = {f.name for f in dataclasses.fields(TrainSettings)}
    for cls in (CriticTrainConfig, ReflTrainConfig):
        assert issubclass(cls, TrainSettings) and shared <= {f.name for f in dataclasses.fields(cls)}
    # The same key lands in the same place in both: output_dir, resume, gradient checkpointing.
    for root in (RewardConfig, ReflConfig):
        cfg = load_config(root, None, ["train.output_dir=x/y", "train.resume=latest",
                                       "train.gradient_checkpointing=true", "train.gradient_accumulation=3"])
        assert (cfg.train.output_dir, cfg.train.resume, cfg.train.gradient_checkpointing,
                cfg.train.gradient_accumulation) == ("x/y", "latest", True, 3)


# The mechanism that refuses a renamed key with its new name, on an example table: the project keeps no
# table before its first release (CHANGELOG.md lists the renames), then one per release.
@dataclasses.dataclass
class RenamedCritic(RewardConfig):
    RENAMED: ClassVar[dict[str, str]] = {
        "train.grad_accum": "train.gradient_accumulation", "train.max_steps": "train.max_updates",
        "train.save_every": "train.checkpoint_every", "train.keep_checkpoints": "train.checkpoints_keep",
        "train.eval_every": "train.validate_every", "train.warmup_steps": "train.warmup_updates",
        "output_dir": "train.output_dir"}


@pytest.mark.parametrize("old, new", [("train.grad_accum=2", "train.gradient_accumulation"),
                                      ("train.max_steps=5", "train.max_updates"),
                                      ("train.save_every=5", "train.checkpoint_every"),
                                      ("train.keep_checkpoints=1", "train.checkpoints_keep"),
                                      ("train.eval_every=5", "train.validate_every"),
                                      ("train.warmup_steps=5", "train.warmup_updates"),
                                      ("output_dir=somewhere", "train.output_dir")])
def test_renamed_keys_name_the_new_ones(old, new, tmp_path):
    with pytest.raises(ConfigError, match=new.replace(".", r"\.")):
        load_config(RenamedCritic, None, [old])
    key, value = old.split("=")
    f = tmp_path / "old.yaml"
    parts = key.split(".")
    f.write_text(f"{parts[0]}:\n  {parts[1]}: {value}\n" if len(parts) == 2 else f"{key}: {value}\n")
    with pytest.raises(ConfigError, match=str(f).replace(".", r"\.")):
        load_config(RenamedCritic, f)


def test_a_removed_key_names_what_replaces_it():
    from refl.config import ReflConfig

    @dataclasses.dataclass
    class RenamedRefl(ReflConfig):
        RENAMED: ClassVar[dict[str, str]] = {
            "step.gradient_checkpointing": "train.gradient_checkpointing",
            "lora.seed": "the LoRA's initialisation is seeded by train.seed; delete lora.seed"}

    renamed = r"step\.gradient_checkpointing was renamed: use train\.gradient_checkpointing"
    with pytest.raises(ConfigError, match=renamed):
        load_config(RenamedRefl, None, ["step.gradient_checkpointing=false"])
    with pytest.raises(ConfigError, match=r"lora\.seed is gone: .*train\.seed"):
        load_config(RenamedRefl, None, ["lora.seed=3"])


def test_no_rename_table_before_the_first_release():
    from refl.config import ReflConfig
    from toyworld.community import ToyPairsConfig
    from toyworld.demo import DemoConfig

    for root in (RewardConfig, ReflConfig, DemoConfig, ToyPairsConfig):
        assert not getattr(root, "RENAMED", {}), root
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train\.grad_accum"):
        load_config(RewardConfig, None, ["train.grad_accum=2"])


def test_no_section_repeats_its_parent():
    from evaluation.config import CompareConfig
    from refl.config import ReflConfig
    from toyworld.demo import DemoConfig

    def keys(cls, prefix=()):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            yield prefix + (f.name,)
            if dataclasses.is_dataclass(tp):
                yield from keys(tp, prefix + (f.name,))

    for root in (RewardConfig, ReflConfig, CompareConfig, DemoConfig):
        stutters = [".".join(k) for k in keys(root) if any(a == b for a, b in zip(k, k[1:]))]
        assert not stutters, (root.__name__, stutters)
    assert ("refl", "step", "method") in set(keys(DemoConfig))


def test_resume_flag_sets_train_resume_on_both_clis():
    from refl.config import ReflConfig
    from runkit.config import config_parser, parse_config_args

    for cls in (RewardConfig, ReflConfig):
        parser = config_parser(cls, None, flags=("train.output_dir", "train.resume"))
        cfg, _ = parse_config_args(parser, ["--set", "train.lr=1e-4", "--resume",
                                            "runs/x: y/checkpoints/update-000002", "--out", "runs/x"])
        assert cfg.train.resume == "runs/x: y/checkpoints/update-000002"  # a path with ': ' survives
        assert cfg.train.output_dir == "runs/x" and cfg.train.lr == 1e-4


def test_a_flag_is_applied_before_set_and_named_in_its_error():
    from refl.config import GenerateConfig
    from runkit.config import ConfigError, config_parser, parse_config_args

    parser = config_parser(GenerateConfig, None, flags=("num_inference_steps", "output_dir"),
                           required=("output_dir",))
    cfg, _ = parse_config_args(parser, ["--num-inference-steps", "3", "--set", "num_inference_steps=5",
                                        "--out", "o"])
    assert cfg.num_inference_steps == 5 and cfg.output_dir == "o"
    with pytest.raises(ConfigError, match="--num-inference-steps 0"):
        parse_config_args(parser, ["--num-inference-steps", "0", "--out", "o"])
    with pytest.raises(ConfigError, match=r"missing output_dir \(--out\)"):
        parse_config_args(parser, [])


def test_lora_init_follows_train_seed():
    from accelerate import Accelerator

    from refl.config import ReflConfig
    from refl.lora_training import prepare_lora_training
    from refl.step import checkpointing_for

    def lora_a(seed):  # what a run with this train.seed starts from, prepared as refl.train prepares it
        cfg = load_config(ReflConfig, None, ["model.name=tiny", "lora.rank=2", "lora.alpha=2.0",
                                             f"train.seed={seed}"])
        checkpointing = checkpointing_for(cfg.step.method, cfg.train.gradient_checkpointing)
        components = prepare_lora_training(cfg.model, cfg.lora, cfg.train, checkpointing, Accelerator())[0]
        return next(p.detach().clone() for n, p in components.unet.named_parameters() if "lora_A" in n)

    assert torch.equal(lora_a(0), lora_a(0)) and not torch.equal(lora_a(0), lora_a(1))


def test_checkpoint_lookup(tmp_path):
    from runkit.checkpoints import checkpoint_dirs, find_checkpoint

    for n, complete in ((9, True), (10, True), (11, False)):
        folder = tmp_path / "checkpoints" / f"update-{n:06d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "state.json").write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["update-000009", "update-000010"]
    assert find_checkpoint(tmp_path, "latest").name == "update-000010"  # the incomplete 11 is skipped
    assert find_checkpoint(tmp_path / "fresh", "latest") is None
    assert find_checkpoint(tmp_path / "fresh", "") is None
    with pytest.raises(FileExistsError, match="update-000010.*--resume latest"):  # fresh over an earlier run
        find_checkpoint(tmp_path, "")
    with pytest.raises(FileNotFoundError, match="update-000011"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "update-000011"))


def test_atomic_dir_keeps_the_old_folder_on_error(tmp_path):
    from runkit.files import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind


def test_no_stays_a_string_where_a_string_is_wanted():
    # YAML 1.1 reads no/yes/on/off as booleans; accelerate's spelling of fp32 is "no".
    from refl.config import ReflConfig

    cfg = load_config(ReflConfig, None, ["train.mixed_precision=no", "train.gradient_checkpointing=no",
                                         "train.validate_at_start=false"])
    assert cfg.train.mixed_precision == "no" and cfg.train.gradient_checkpointing is False
    assert cfg.train.validate_at_start is False


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the last of two `train:` blocks silently: the run would train with half the settings.
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  batch_size: 4\n  max_updates: 2\nloss:\n  margin: 0.1\ntrain:\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"exp.yaml.*'train' is written twice.*lines 1 and 6"):
        load_config(RewardConfig, f)
    f.write_text("train:\n  lr: 1e-3\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"'lr' is written twice.*lines 2 and 3"):
        load_config(RewardConfig, f)


def test_a_byte_order_mark_is_not_part_of_a_config_or_a_prompt(tmp_path):
    from refl.prompts import read_prompt_file

    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 1e-3\n", encoding="utf-8-sig")
    assert load_config(RewardConfig, f).train.lr == 1e-3
    txt = tmp_path / "prompts.txt"
    txt.write_text("a green circle\na red square\n", encoding="utf-8-sig")
    assert read_prompt_file(txt) == ["a green circle", "a red square"]
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\na green circle\n", encoding="utf-8-sig")
    assert read_prompt_file(csv) == ["a green circle"]


def _fp16_on_cpu_case(command: str, tmp_path) -> tuple:
    """(main, argv) of `command` asked for fp16 on the CPU."""
    from importlib import import_module

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = str(tmp_path / "out")
    fp16 = ["--set", "train.mixed_precision=fp16", "--out", out]
    pairs = ["--set", f"data.train={tmp_path / 'pairs.parquet'}"]
    sample = ["--model", "tiny", "--prompts-file", str(prompts), "--device", "cpu", "--mixed-precision",
              "fp16", "--out", out]
    bench = ["--set", "device=cpu", "--set", "mixed_precision=fp16"]
    cases = {
        "train-refl": ("refl.cli:train_main", ["--set", "model.name=tiny", *fp16]),
        "train-reward": ("reward.cli:train_main", ["--set", "model.model_name=tiny-clip", *pairs, *fp16]),
        "train-preference": ("preference.cli:train_main", ["--set", "model.name=tiny", *pairs, *fp16]),
        "generate": ("refl.cli:generate_main", sample),
        "compare": ("evaluation.cli:compare_main", [*sample, "--critic", "tiny-clip"]),
        "bench-refl": ("benchmarks.refl:main", [*bench, "--set", "model=tiny"]),
        "bench-reward": ("benchmarks.reward:main", [*bench, "--set", "critics=[tiny-clip]"]),
    }
    entry, argv = cases[command]
    module, func = entry.split(":")
    return getattr(import_module(module), func), argv


@pytest.mark.parametrize("command", ["train-refl", "train-reward", "train-preference", "generate", "compare",
                                     "bench-refl", "bench-reward"])
def test_bad_input_3_fp16_on_the_cpu_is_refused_in_one_line_before_any_work(command, tmp_path, capsys,
                                                                           monkeypatch):
    """It printed three warnings and ran. The trainers run where accelerate puts them: on the CPU here."""
    import refl.components

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model loaded before fp16 on the CPU was refused")

    # Every module imported before any is patched: a module first imported after refl.components was patched
    # would bind the stand-in for good (monkeypatch restores only what it set).
    names = ("refl.components", "refl.lora_training", "refl.generate", "evaluation.harness")
    modules = [__import__(m, fromlist=["_"]) for m in names]
    for mod in modules:
        if hasattr(mod, "load_components"):
            monkeypatch.setattr(mod, "load_components", must_not_load)
    assert refl.components.load_components is must_not_load
    main, argv = _fp16_on_cpu_case(command, tmp_path)
    key = "train.mixed_precision=fp16" if command.startswith("train") else "mixed_precision=fp16"
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0] and "on the CPU" in lines[0] and "bf16" in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out" / "samples").exists()


def _config_class(name: str):
    from importlib import import_module

    module, cls = {"reward": ("reward.config", "RewardConfig"), "refl": ("refl.config", "ReflConfig"),
                   "generate": ("refl.config", "GenerateConfig"),
                   "check": ("reward.config", "CheckPairsConfig"),
                   "preference": ("preference.config", "PreferenceConfig"),
                   "toy-pairs": ("toyworld.community", "ToyPairsConfig")}[name]
    return getattr(import_module(module), cls)


# Bad input 3, the new sweep: each of these ran (silently wrong, or a traceback later); now one line naming
# the key when the config is read, before any work.
@pytest.mark.parametrize("config, settings, names", [
    ("reward", ["train.lr=inf"], "train.lr must be >= 0 and finite"),  # trained to NaN
    ("reward", ["train.adam_betas=[0.9]"], "train.adam_betas must be two numbers"),  # IndexError in AdamW
    ("reward", ["train.warmup_updates=-5"], "train.warmup_updates=-5: must be >= 0"),
    ("reward", ["train.validate_every=-1"], "train.validate_every=-1"),  # validated after every update
    ("reward", ["train.checkpoint_every=-1"], "train.checkpoint_every=-1"),
    ("reward", ["train.checkpoints_keep=-1"], "train.checkpoints_keep=-1"),  # kept every checkpoint
    ("reward", ["train.log_every=0"], "train.log_every must be >= 1"),  # ZeroDivisionError
    ("refl", ["train.max_grad_norm=-1"], "train.max_grad_norm >= 0"),  # no clipping, silently
    ("refl", ["train.seed=-1"], "train.seed must be >= 0"),  # numpy's error after the model loaded
    ("reward", ["data.val_fraction=1.5"], "data.val_fraction must be in [0, 1)"),
    ("reward", ["data.val_fraction=-0.1"], "data.val_fraction must be in [0, 1)"),  # no validation, silently
    ("reward", ["data.num_workers=-1"], "data.num_workers must be >= 0"),  # torch's line, no key
    ("reward", ["loss.margin=-1"], "loss.margin must be >= 0"),  # every triplet satisfied: nothing trained
    ("reward", ["train.epochs=0"], "train.epochs=0 with train.max_updates=0 trains nothing"),
    ("refl", ["train.validation_images_per_prompt=0"], "train.validation_images_per_prompt"),  # torch.cat
    ("refl", ["train.validation_num_inference_steps=0"], "train.validation_num_inference_steps"),
    ("refl", ["train.validation_guidance_scale=nan"], "train.validation_guidance_scale must be >= 0"),
    ("refl", ["step.kl_weight=-1"], "step.kl_weight=-1"),  # pushed away from the base, silently
    ("refl", ["step.reg_weight=nan"], "step.reg_weight=nan"),  # the regulariser silently off
    ("refl", ["step.eta=-1"], "step.eta=-1"),
    ("refl", ["reward.kind=mix", "reward.mix={contrast: .nan}"], "reward.mix.contrast=nan"),  # NaN loss later
    ("refl", ["step.reg_weight=0.1", "data.reg_pool_size=0"], "needs data.reg_pool_size >= 1"),
    ("refl", ["lora.train_text_encoder=true", "lora.text_target_modules=[]"], "text_target_modules is empty"),
    ("refl", ["lora.target_modules=[]"], "target_modules is empty"),  # peft's line after the model loaded
    ("preference", ["data.num_workers=-1"], "data.num_workers must be >= 0"),
    ("preference", ["train.log_every=0"], "train.log_every must be >= 1"),
    ("generate", ["lora_scale=nan"], "lora_scale a number"),  # NaN images
    ("generate", ["guidance_scale=-1"], "guidance_scale must be >= 0"),
    ("check", ["num_workers=-1"], "num_workers must be >= 0"),
    ("toy-pairs", ["n_candidates=1"], "n_candidates >= 2"),  # an empty pairs set, exit 0
    ("toy-pairs", ["n_train_prompts=0"], "n_train_prompts and n_heldout_prompts must be >= 1"),
])
def test_bad_input_3_sweep_settings_are_refused_when_the_config_is_read(config, settings, names):
    with pytest.raises(ConfigError) as caught:
        load_config(_config_class(config), None, settings)
    assert names in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_bad_input_3_sweep_a_config_folder_and_device_names(tmp_path):
    from runkit.config import resolve_device

    with pytest.raises(ConfigError, match="is a folder; name the YAML file"):
        load_config(RewardConfig, tmp_path)
    with pytest.raises(ConfigError, match="'gpu0' is not a device name"):  # torch's RuntimeError traceback
        resolve_device("gpu0")
    if not torch.cuda.is_available():  # "Found no NVIDIA driver" traceback
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"
