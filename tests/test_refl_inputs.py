"""Bad input to ReFL and generation: a clear error before the work (exit 2, one line naming the file and
the fix), nothing already written lost, nothing stale reused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from refl.cli import generate_main
from refl.components import load_components, save_pipeline
from refl.lora import LoraConfig, add_lora, save_lora
from runkit.checkpoints import checkpoint_dirs


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny-sd"
    save_pipeline(load_components("tiny"), path)
    return path


@pytest.fixture(scope="module")
def tiny_lora_dir(tmp_path_factory):
    components = load_components("tiny")
    add_lora(components, LoraConfig(rank=2, alpha=4.0))
    return save_lora(components, tmp_path_factory.mktemp("lora") / "lora")


def _generate(base, out, *extra):
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    return generate_main(["--model", str(base), "--prompts-file", str(prompts), "--num-inference-steps", "2",
                          "--device", "cpu",
                          "--out", str(out), *extra])


def _error_line(capsys) -> str:
    """The command's one error line (progress bars may come before it)."""
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_generate_refuses_a_used_folder_and_overwrite_leaves_only_the_new_images(tiny_base, tmp_path, capsys):
    out = tmp_path / "gen"
    assert _generate(tiny_base, out, "--images-per-prompt", "3") == 0
    assert len(list(out.glob("*.png"))) == 6
    (out / "notes.txt").write_text("mine")
    assert _generate(tiny_base, out, "--images-per-prompt", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 6  # refused: nothing touched
    assert _generate(tiny_base, out, "--images-per-prompt", "1", "--overwrite") == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows) and len(rows) == 2
    assert (out / "notes.txt").read_text() == "mine"  # a file generate did not write stays


def test_generate_refuses_zero_images_before_loading_the_model(tmp_path, capsys):
    # The model does not exist: the --images-per-prompt check must come first.
    assert _generate(tmp_path / "no-such-model", tmp_path / "gen", "--images-per-prompt", "0") == 2
    assert "--images-per-prompt 0" in capsys.readouterr().err and not (tmp_path / "gen").exists()
    assert _generate(tmp_path / "no-such-model", tmp_path / "gen", "--num-inference-steps",
                     "0") == 2  # a ZeroDivisionError
    assert "--num-inference-steps" in capsys.readouterr().err and not (tmp_path / "gen").exists()


def test_a_prompts_file_that_is_not_text_is_named_with_the_fix(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xb9\x00")  # an image saved as .txt
    assert generate_main(["--model", "tiny", "--prompts-file", str(tmp_path / "prompts.txt"), "--out",
                          str(tmp_path / "gen")]) == 2
    line = _error_line(capsys)
    assert "prompts.txt is not UTF-8 text" in line and "one per line" in line


@pytest.mark.parametrize("setting, names", [
    ("lora.rank=0", "rank >= 1"), ("lora.alpha=-1", "alpha > 0"), ("train.lr=-1", "train.lr must be >= 0"),
    ("train.lr=nan", "train.lr must be >= 0"), ("step.guidance_scale=-1", "guidance_scale must be >= 0")])
def test_settings_that_cannot_train_are_refused_before_the_model_loads(tmp_path, capsys, setting, names):
    from refl.cli import train_main

    out = tmp_path / "run"
    assert train_main(["--set", "model.name=no-such-model", "--set", f"train.output_dir={out}",
                       "--set", setting]) == 2
    assert names in _error_line(capsys) and not out.exists()


def test_export_refuses_to_replace_a_file_without_overwrite(tiny_lora_dir, tmp_path, capsys):
    from refl.cli import export_main

    notes = tmp_path / "notes.safetensors"
    notes.write_text("mine")
    assert export_main([str(tiny_lora_dir), "--output-file", str(notes)]) == 2
    assert "--overwrite" in _error_line(capsys) and notes.read_text() == "mine"
    assert export_main([str(tiny_lora_dir), "--output-file", str(tmp_path / "notes.txt")]) == 2
    assert ".safetensors" in _error_line(capsys) and not (tmp_path / "notes.txt").exists()
    assert export_main([str(tiny_lora_dir), "--output-file", str(notes), "--overwrite"]) == 0
    assert notes.read_bytes() != b"mine"


def test_an_empty_lora_folder_names_the_file_it_needs(tiny_base, tmp_path, capsys):
    (tmp_path / "lora").mkdir()
    assert _generate(tiny_base, tmp_path / "gen", "--images-per-prompt", "1", "--lora",
                     str(tmp_path / "lora")) == 2
    err = _error_line(capsys)
    assert "pytorch_lora_weights.safetensors" in err and ".bin" not in err


def test_a_lora_of_another_base_model_says_so(tiny_lora_dir, tmp_path, capsys, caplog):
    other = tmp_path / "toy-sd"
    save_pipeline(load_components("toy"), other)
    assert _generate(other, tmp_path / "gen", "--images-per-prompt", "1", "--lora", str(tiny_lora_dir)) == 2
    assert "another base model" in _error_line(capsys)
    # diffusers logs every size mismatch (65 lines for SDXL) before raising: one line is enough.
    assert not [r for r in caplog.records if "size mismatch" in r.getMessage()]


@pytest.mark.parametrize("damage,expected", [
    ("truncated", "cannot be read as safetensors"),
    ("kohya keys", "is not of the diffusers LoRA layout (<unet|transformer|text_encoder|text_encoder_2>"),
    ("renamed prefix", "key 'model.down_blocks"),
    ("rank 0", "has rank 0"),
])
def test_a_broken_lora_file_is_one_line_naming_the_file_before_the_model_loads(tiny_lora_dir, tmp_path,
                                                                               capsys, monkeypatch, damage,
                                                                               expected):
    import shutil

    from safetensors.torch import load_file, save_file

    import refl.generate

    lora = tmp_path / "lora"
    shutil.copytree(tiny_lora_dir, lora)
    weights = lora / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "kohya keys":
        save_file({"lora_unet_" + k.replace(".", "_"): v for k, v in tensors.items()}, weights)
    elif damage == "renamed prefix":
        save_file({k.replace("unet.", "model.", 1): v for k, v in tensors.items()}, weights)
    else:
        save_file({k: v[:0] if ".down." in k or ".lora_A." in k else v[:, :0] for k, v in tensors.items()},
                  weights)
    loads = []
    monkeypatch.setattr(refl.generate, "load_components", lambda *a, **k: loads.append(a))
    assert _generate(tmp_path / "no-such-model", tmp_path / "gen", "--lora", str(lora)) == 2
    err = _error_line(capsys)
    assert str(weights) in err and expected in err and not loads, err


def test_a_missing_local_model_folder_is_said_to_not_exist(tmp_path, capsys):
    assert _generate(tmp_path / "no-such-model", tmp_path / "gen") == 2
    err = _error_line(capsys)
    assert "does not exist" in err and "no-such-model" in err and "connection" not in err.lower()


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_the_lora_file_check_passes_what_save_lora_writes_for_every_family(model, tmp_path):
    from refl.lora import check_lora_dir

    components = load_components(model)
    add_lora(components, LoraConfig(rank=2, alpha=4.0, train_text_encoder=model in ("tiny", "tiny-sdxl")))
    assert check_lora_dir(save_lora(components, tmp_path / "lora")).name == "pytorch_lora_weights.safetensors"


def test_generate_checks_its_critic_before_the_model_loads(tmp_path, capsys):
    # The model folder does not exist either: the critic is named first, before any loading.
    assert _generate(tmp_path / "no-such-model", tmp_path / "gen", "--critic",
                     str(tmp_path / "no-critic")) == 2
    assert "no-critic" in _error_line(capsys)


def test_a_failed_checkpoint_write_names_the_folder_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from refl.train import ReflConfig, train
    from runkit.checkpoints import checkpoint_dirs
    from runkit.config import load_config

    real_save = Accelerator.save_state
    calls = {"n": 0}

    def disk_fills_up(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_save(self, output_dir, **kw)
        (torch.zeros(1000).numpy().tofile(f"{output_dir}/partial.bin"))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(Accelerator, "save_state", disk_fills_up)
    out = tmp_path / "run"
    cfg = load_config(ReflConfig, None, [f"train.output_dir={out}", "model.name=tiny", "reward.kind=contrast",
                                         "train.max_updates=2", "train.batch_size=1",
                                         "train.checkpoint_every=1",
                                         "train.log_with=none", "step.num_inference_steps=2",
                                         "step.cut_range=[0,1]"])
    with pytest.raises(OSError, match=r"could not write .*update-000002: No space left on device"):
        train(cfg)
    assert [p.name for p in checkpoint_dirs(out)] == ["update-000001"]  # the earlier one stays whole
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_the_last_checkpoint_is_written_before_the_last_validation(tmp_path, monkeypatch):
    import refl.train as refl_train
    from runkit.checkpoints import checkpoint_dirs
    from runkit.config import load_config

    def validation_crashes(*args, **kwargs):
        raise RuntimeError("a bug in a judge")

    monkeypatch.setattr(refl_train, "validate", validation_crashes)
    out = tmp_path / "run"
    cfg = load_config(refl_train.ReflConfig, None, [
        f"train.output_dir={out}", "model.name=tiny", "reward.kind=contrast", "train.max_updates=2",
        "train.batch_size=1", "train.checkpoint_every=2", "train.validate_every=2", "train.log_with=none",
        "train.validation_prompts=[a cat]", "train.validation_num_inference_steps=2",
        "step.num_inference_steps=2",
        "step.cut_range=[0,1]", "train.validate_at_start=false"])  # the crash is in update 2's validation
    with pytest.raises(RuntimeError, match="a bug in a judge"):
        refl_train.train(cfg)
    (last,) = checkpoint_dirs(out)
    assert last.name == "update-000002" and (last / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(tmp_path, capsys):
    """Without --resume, a second run in the same output_dir would put its checkpoints beside the first's,
    and a later --resume latest could continue the wrong one: refused, naming the folder and both ways out."""
    from refl.cli import train_main

    out = tmp_path / "run"
    args = ["--set", f"train.output_dir={out}", "--set", "model.name=tiny", "--set", "reward.kind=contrast",
            "--set", "train.max_updates=1", "--set", "train.batch_size=1", "--set", "train.log_with=none",
            "--set", "train.validation_prompts=[]", "--set", "step.num_inference_steps=2",
            "--set", "step.cut_range=[0,1]"]
    assert train_main(args) == 0
    first = sorted(p.name for p in (out / "checkpoints").iterdir())
    run_config = (out / "config.yaml").read_text()
    assert train_main(args + ["--set", "train.lr=0.5"]) == 2
    line = _error_line(capsys)
    assert str(out) in line and "--resume latest" in line and "update-000001" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first  # nothing written
    assert (out / "config.yaml").read_text() == run_config  # the earlier run's settings stay
    assert train_main(args + ["--resume", "latest"]) == 0  # continuing it is fine


def test_resuming_with_a_changed_lora_rank_names_the_changed_setting(tmp_path, capsys, caplog):
    """A checkpoint that no longer fits (the LoRA rank changed) is one line naming the checkpoint and the
    changed setting, not torch's size-mismatch listing; the run's config and checkpoints stay. A change that
    fits (more updates) resumes and is logged."""
    from refl.cli import train_main

    out = tmp_path / "run"
    args = ["--set", f"train.output_dir={out}", "--set", "model.name=tiny", "--set", "reward.kind=contrast",
            "--set", "train.batch_size=1", "--set", "train.log_with=none",
            "--set", "train.validation_prompts=[]", "--set", "step.num_inference_steps=2",
            "--set", "step.cut_range=[0,1]"]
    assert train_main(args + ["--set", "train.max_updates=1"]) == 0
    run_config = (out / "config.yaml").read_text()
    changed = ["--set", "train.max_updates=2", "--set", "lora.rank=8", "--resume", "latest"]
    assert train_main(args + changed) == 2  # seen in the checkpoint's LoRA file, before the model loads
    line = _error_line(capsys)
    assert "update-000001" in line and "rank 4 but lora.rank=8" in line and "--set lora.rank=4" in line
    changed = ["--set", "train.max_updates=2", "--set", "lora.target_modules=[to_q]", "--resume", "latest"]
    assert train_main(args + changed) == 2  # seen when the checkpoint loads
    line = _error_line(capsys)
    assert "update-000001" in line and "does not fit" in line and "lora.target_modules" in line
    assert (out / "config.yaml").read_text() == run_config
    assert [p.name for p in checkpoint_dirs(out)] == ["update-000001"]
    with caplog.at_level("WARNING", logger="runkit.checkpoints"):
        assert train_main(args + ["--set", "train.max_updates=2", "--resume", "latest"]) == 0
    assert any("train.max_updates: 1 -> 2" in r.getMessage() for r in caplog.records)
    assert "max_updates: 2" in (out / "config.yaml").read_text()


def test_prompts_longer_than_the_text_encoder_reads_are_counted_at_start(tmp_path, caplog):
    """ReFL cuts them as the stock pipeline does; training says how many, once, instead of nothing."""
    from refl import train as refl_train
    from refl.config import ReflConfig
    from runkit.config import load_config

    long = "a " + "very " * 100 + "long prompt about a cat"
    (tmp_path / "prompts.txt").write_text(f"a cat\n{long}\na dog\n")
    cfg = load_config(ReflConfig, None, [
        "model.name=tiny", "reward.kind=contrast", f"data.prompts_file={tmp_path / 'prompts.txt'}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_updates=1", "train.batch_size=1",
        "train.log_with=none", "train.validation_prompts=[]", "step.num_inference_steps=2",
        "step.cut_range=[0,1]"])
    with caplog.at_level("WARNING"):
        refl_train.train(cfg)
    said = [r.getMessage() for r in caplog.records if "longer than the text encoder" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 of the 3 prompts of data")
    assert "text encoder's 16 tokens" in said[0]  # the tiny preset's context length
    assert not any("Token indices sequence length" in r.getMessage() for r in caplog.records)


def test_null_prompt_cells_are_skipped_not_read_as_the_words_none_and_nan(tmp_path, caplog):
    import pandas as pd

    from refl.prompts import read_prompt_file

    pd.DataFrame({"prompt": ["a cat", None, float("nan"), "a dog"]}).to_parquet(tmp_path / "p.parquet")
    with caplog.at_level("WARNING", logger="refl.prompts"):
        assert read_prompt_file(tmp_path / "p.parquet") == ["a cat", "a dog"]
    assert any("2 empty (null) cell(s)" in r.getMessage() for r in caplog.records)


def test_a_missing_vae_folder_is_named_as_model_vae(tmp_path, capsys):
    from refl.cli import train_main

    out = tmp_path / "run"
    assert train_main(["--set", "model.name=tiny", "--set", f"model.vae={tmp_path / 'no-vae'}",
                       "--set", f"train.output_dir={out}"]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: model.vae {tmp_path / 'no-vae'} does not exist")
    assert "huggingface.co" not in line  # diffusers' two-line hub message


# ------------------------------------------- bad input 3: ReFL checks its inputs before the model loads
def _refl_inputs_case(case: str, tmp_path, tiny_lora_dir) -> tuple[list[str], list[str]]:
    """(the --set overrides of a ReFL run whose `case` input is bad, what its one error line names)."""
    import shutil

    out = tmp_path / "run"
    if case == "critic folder":
        return [f"reward.critic={tmp_path / 'runs' / 'critic'}"], ["reward.critic", "does not exist"]
    if case == "critic name":
        return ["reward.critic=ViT-Q-99"], ["reward.critic ViT-Q-99", "open_clip"]
    if case == "ensemble member":
        return [f"reward.critic=[toy-clip, {tmp_path / 'nope'}]"], ["reward.critic", "nope", "does not exist"]
    if case == "standard weights":
        return ["reward.kind=hpsv2", f"reward.standard={{hpsv2: {tmp_path / 'HPS_v2_compressed.pt'}}}"], [
            "reward.standard.hpsv2", "HPS_v2_compressed.pt"]
    if case == "mix term":
        return ["reward.kind=mix", "reward.mix={critic: 1.0, aesthetic: 0.5}",
                f"reward.standard={{aesthetic: {tmp_path / 'missing.pth'}}}"], ["reward.standard.aesthetic",
                                                                                 "missing.pth"]
    if case == "judge":
        return [f"train.heldout_evaluators=[critic:{tmp_path / 'judge'}]"], ["train.heldout_evaluators",
                                                                              "judge", "does not exist"]
    if case == "output is a file":
        out.write_text("notes")
        return [], ["train.output_dir", "is a file"]
    if case == "output under a file":
        (tmp_path / "notes").write_text("notes")
        return [f"train.output_dir={tmp_path / 'notes' / 'run'}"], ["train.output_dir", "notes is a file"]
    ckpt = out / "checkpoints" / "update-000001"
    shutil.copytree(tiny_lora_dir, ckpt / "lora")  # rank 2
    (ckpt / "state.json").write_text('{"update": 1}')
    if case == "resumed lora rank":
        return ["train.resume=latest"], ["train.resume", "rank 2 but lora.rank=4", "--set lora.rank=2"]
    weights = ckpt / "lora" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # "resumed lora truncated"
    return ["train.resume=latest"], ["train.resume", "cannot be read as safetensors", "earlier checkpoint"]


@pytest.mark.parametrize("case", ["critic folder", "critic name", "ensemble member", "standard weights",
                                  "mix term", "judge", "output is a file", "output under a file",
                                  "resumed lora rank", "resumed lora truncated"])
def test_bad_input_3_refl_checks_critic_lora_and_output_folder_before_the_model_loads(case, tmp_path, capsys,
                                                                                     monkeypatch,
                                                                                     tiny_lora_dir):
    """Each is one line naming the key and the fix, and the diffusion model is never loaded (it was loaded
    first: seconds on the toy, minutes on SDXL)."""
    import refl.lora_training
    from refl.cli import train_main

    def must_not_load(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before the inputs were checked")

    monkeypatch.setattr(refl.lora_training, "load_components", must_not_load)
    overrides, names = _refl_inputs_case(case, tmp_path, tiny_lora_dir)
    args = ["--set", "model.name=tiny", "--set", f"train.output_dir={tmp_path / 'run'}", "--set",
            "train.log_with=none"]
    for setting in overrides:
        args += ["--set", setting]
    assert train_main(args) == 2
    line = _error_line(capsys)
    assert all(n in line for n in names), line


@pytest.mark.parametrize("method, table, names", [
    ("dpo", None, ["pairs.parquet", "does not exist"]),
    ("kto", "label", ["row 1", "label=0.5"]),
])
def test_bad_input_3_preference_reads_its_feedback_before_the_model_loads(method, table, names, tmp_path,
                                                                         capsys, monkeypatch):
    """The feedback was indexed after the diffusion model loaded (minutes on SDXL before a typo showed)."""
    import refl.lora_training
    from preference.cli import train_main
    from reward.synthetic import make_colour_pairs

    def must_not_load(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before the feedback was read")

    monkeypatch.setattr(refl.lora_training, "load_components", must_not_load)
    data = tmp_path / "pairs.parquet"
    if table is not None:
        pairs = pd.read_parquet(make_colour_pairs(tmp_path / "colour", n_pairs=3, size=16, seed=0))
        rows = pd.DataFrame({"prompt": pairs["prompt"], "image": pairs["pos_path"], "label": [1.0, 0.5, 0.0]})
        data = tmp_path / "colour" / "labels.parquet"  # beside the images its paths name
        rows.to_parquet(data)
    assert train_main(["--set", "model.name=tiny", "--set", f"method={method}", "--set", f"data.train={data}",
                       "--set", "train.log_with=none", "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert all(n in line for n in names), line


def test_bad_input_3_a_lora_target_typo_among_good_ones_is_refused_before_the_model_loads(base_dir, tmp_path,
                                                                                         capsys, monkeypatch):
    """peft refused only a list of which nothing matched: [to_q, to_kk] trained to_q alone, without a word,
    and a list that matched nothing was named only after the model loaded."""
    import refl.lora_training
    from refl.cli import train_main
    from refl.components import load_components
    from refl.lora import LoraConfig, add_lora

    with pytest.raises(ValueError, match=r"lora.target_modules \['to_kk'\] match no module of the sd unet"):
        add_lora(load_components("tiny"), LoraConfig(target_modules=["to_q", "to_kk"]))

    def must_not_load(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before lora.target_modules was checked")

    monkeypatch.setattr(refl.lora_training, "load_components", must_not_load)
    assert train_main(["--set", f"model.name={base_dir}", "--set", "lora.target_modules=[to_q,to_kk]",
                       "--set", "train.log_with=none", "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert "lora.target_modules ['to_kk'] match no module of the denoiser of" in line, line


# ------------------------------------------------- bad input 3, the new sweep: files of the wrong kind
@pytest.mark.parametrize("name, content, names", [
    ("prompts.json", '["a cat", "a dog"]', "a .json file is not a prompts file"),  # trained on '["a cat"...'
    ("prompts.yaml", "- a cat\n", "a .yaml file is not a prompts file"),
    ("prompts_dir", None, "is a folder; name a .txt file"),  # 'does not exist'
])
def test_bad_input_3_sweep_a_prompts_file_of_the_wrong_kind_is_refused(tmp_path, capsys, name, content,
                                                                       names):
    from refl.cli import train_main

    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    quick = ["--set", "train.max_updates=1", "--set", "step.num_inference_steps=2", "--set",
             "step.cut_range=[0,1]", "--set", "train.validation_prompts=[]", "--set", "reward.kind=contrast"]
    assert train_main(["--set", "model.name=tiny", "--set", f"data.prompts_file={path}", *quick,
                       "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert names in line and "data.prompts_file" in line and not (tmp_path / "run").exists(), line


def test_bad_input_3_sweep_a_lora_weights_file_for_the_folder_and_modules_that_match_nothing(tiny_lora_dir,
                                                                                            tmp_path, capsys):
    """The weights file given as --lora was 'LoRA folder ... does not exist'; target modules that match
    nothing got peft's text, naming no setting; --out under a file got '[Errno 20] Not a directory'."""
    from refl.components import load_components
    from refl.lora import LORA_WEIGHTS

    weights = str(tiny_lora_dir / LORA_WEIGHTS)
    assert _generate(tmp_path / "no-such-model", tmp_path / "gen", "--lora", weights) == 2
    line = _error_line(capsys)
    assert "is a file; name the folder holding it" in line and "does not exist" not in line, line
    (tmp_path / "notes").write_text("mine")
    assert generate_main(["--model", "tiny", "--prompts-file", str(tmp_path / "prompts.txt"), "--out",
                          str(tmp_path / "notes" / "gen")]) == 2
    assert "--out" in (line := _error_line(capsys)) and "notes is a file" in line, line
    with pytest.raises(ValueError, match=r"lora.target_modules \['to_qq'\] match no module of the sd "):
        add_lora(load_components("tiny"), LoraConfig(target_modules=["to_qq"]))
    with pytest.raises(ValueError, match=r"lora.text_target_modules \['qq'\] match no module of text_"):
        add_lora(load_components("tiny"), LoraConfig(train_text_encoder=True, text_target_modules=["qq"]))
