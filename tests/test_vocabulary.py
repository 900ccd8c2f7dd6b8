"""One vocabulary (docs/vocabulary.md): every config class and every command's parser, walked.

A name the page refuses, a count not named as one, a shared name used with another type, or a flag spelled
otherwise than its config key fails here, naming the class or command and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import re
import typing
from pathlib import Path

import pytest
import tomllib

from runkit.config import MIXED_PRECISION, flag_for

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runkit", "reward", "refl", "preference", "evaluation", "toyworld", "benchmarks")
# Options of a command that are about the run, not a setting of its config.
RUN_OPTIONS = {"-h", "--help", "--config", "--set", "--quick", "--until"}


def refused_names() -> set[str]:
    """The identifiers in the 'refused synonyms' column of docs/vocabulary.md's table of shared names."""
    names = set()
    for line in (REPO / "docs" / "vocabulary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and not set(cells[0]) <= {"-"} and cells[0] != "name":
            names.update(n for n in re.findall(r"`([^`]+)`", cells[2]) if n.isidentifier())
    return names


def config_classes() -> dict[str, type]:
    """Every config dataclass of the packages (`...Config`, `...Settings`), by qualified name."""
    found = {}
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == info.name
                        and name.endswith(("Config", "Settings"))):
                    found[f"{info.name}.{name}"] = obj
    return found


def fields_of(cls: type) -> list[tuple[str, object, object]]:
    """(name, type, default) of each field of `cls`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, hints[f.name], default))
    return out


def type_name(tp) -> str:
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


CLASSES = config_classes()
FIELDS = [(qual, name, tp, default)
          for qual, cls in sorted(CLASSES.items()) for name, tp, default in fields_of(cls)]
COUNT_NOUNS = ("prompts", "samples", "images", "users", "members", "renders", "candidates")
# The type each shared name has wherever it appears.
SHARED_TYPES = {"output_dir": {"str"}, "output_file": {"str"}, "num_inference_steps": {"int"},
                "guidance_scale": {"float"}, "batch_size": {"int"}, "seed": {"int"},
                "mixed_precision": {"str"},
                "device": {"str"}, "critic": {"str", "str | list[str]"}, "prompts": {"list[str]"},
                "prompts_file": {"str", "str | None", "Optional[str]"}, "lora": {"str"},
                "lora_scale": {"float"},
                "scheduler": {"str"}, "format": {"str"}, "layout": {"str"}}


def test_the_walk_sees_every_packages_configs():
    # A walk that found nothing would pass every check below.
    names = {qual.rsplit(".", 1)[1] for qual in CLASSES}
    assert {"TrainSettings", "RewardConfig", "ReflConfig", "CompareConfig", "DemoConfig", "GenerateConfig",
            "StepConfig", "ModelConfig", "PretrainSDConfig"} <= names
    assert {"steps", "dtype", "selector", "fmt", "validation_steps"} <= refused_names()


def test_no_config_uses_a_refused_name():
    refused = refused_names()
    wrong = [f"{qual}.{name}" for qual, name, _, _ in FIELDS
             if name in refused or (name.endswith("_steps") and not name.endswith("num_inference_steps"))
             or (name.endswith("_guidance") or name.endswith("_batch"))]
    assert not wrong, f"refused names (docs/vocabulary.md): {wrong}"


def test_counts_say_they_are_counts_and_collections_are_lists():
    wrong = []
    for qual, name, tp, _ in FIELDS:
        noun = name.rsplit("_", 1)[-1]
        if tp is int and noun in COUNT_NOUNS and not name.startswith(("n_", "max_")):
            wrong.append(f"{qual}.{name}: a count, name it n_{name}")
        if noun == "prompts" and tp is not int and type_name(tp) != "list[str]":
            wrong.append(f"{qual}.{name}: prompts are a list ({type_name(tp)}); a file is prompts_file")
    assert not wrong, wrong


def test_a_shared_name_has_one_type_everywhere():
    # A section (`lora:` of ReFL, `critic:` of the demo) is that thing's own config, not a second meaning.
    wrong = [f"{qual}.{name}: {type_name(tp)} (expected {sorted(SHARED_TYPES[name])})"
             for qual, name, tp, _ in FIELDS if name in SHARED_TYPES and not dataclasses.is_dataclass(tp)
             and type_name(tp) not in SHARED_TYPES[name]]
    assert not wrong, wrong


def test_device_and_precision_defaults_mean_the_same_everywhere():
    devices = {f"{qual}.{name}": default for qual, name, _, default in FIELDS if name == "device"}
    assert devices and set(devices.values()) == {""}, devices
    precisions = {f"{qual}.{name}": default for qual, name, _, default in FIELDS if name == "mixed_precision"}
    assert precisions and set(precisions.values()) <= set(MIXED_PRECISION), precisions


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__("parsed")
        self.parser = parser


def command_parser(entry: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a console script builds, caught as it parses (nothing runs)."""
    module, func = entry.split(":")

    def catch(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    with pytest.raises(_Parsed) as caught:
        getattr(importlib.import_module(module), func)([])
    return caught.value.parser


COMMANDS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"] | {
    f"python -m benchmarks.{name}": f"benchmarks.{name}:main" for name in ("refl", "memory_model", "reward")}


@pytest.mark.parametrize("script", sorted(COMMANDS))
def test_every_command_reads_a_typed_config_with_flags_spelled_as_their_keys(script, monkeypatch):
    parser = command_parser(COMMANDS[script], monkeypatch)
    defaults = parser._defaults
    assert dataclasses.is_dataclass(defaults.get("_config_class")), f"{script} reads no typed config"
    keys = defaults["_config_keys"]
    refused = refused_names()
    for action in parser._actions:
        flags = [s for s in action.option_strings if s not in RUN_OPTIONS]
        if not action.option_strings:  # a positional sets the key it is named for
            key = action.dest.replace("__", ".")
            assert keys.get(action.dest) == key, f"{script}: positional {action.dest}"
            continue
        for flag in flags:
            assert action.dest in keys, f"{script} {flag} sets no config key"
            assert flag == flag_for(keys[action.dest]), f"{script}: {flag} sets {keys[action.dest]}"
            assert flag.lstrip("-").replace("-", "_") not in refused, f"{script}: {flag} is a refused name"
    assert {"--config", "--set"} <= set(parser._option_string_actions), script
