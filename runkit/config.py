"""Typed experiment configs of every package, and the training settings both trainers share.

A config is a tree of dataclasses. A YAML file under `configs/` holds only the overrides of one
experiment; `--set a.b=c` on the command line overrides further. Unknown keys are refused with
their full dotted name, so a typo never silently falls back to a default; a key that was renamed is
refused with its new name (the root class's `RENAMED`: old dotted key -> new one, or -> a sentence).
Keys renamed before the first release are not kept there (CHANGELOG.md lists them); from the first
release on, a renamed key stays in its root class's `RENAMED` for one release.

`TrainSettings` is the one vocabulary of a training loop (`train:` of the critic trainer and of ReFL):
the same key means the same thing in both, and each trainer only changes defaults and adds its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from runkit.files import atomic_write_bytes

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the fix."""


# The compute dtypes every command accepts, as accelerate spells them ("no" = fp32).
MIXED_PRECISION = ("no", "fp16", "bf16")


def check_mixed_precision(value: str, key: str) -> None:
    """Refuses a mixed_precision value outside MIXED_PRECISION, naming the key."""
    if value not in MIXED_PRECISION:
        raise ConfigError(f"{key}={value!r}; choose one of {', '.join(MIXED_PRECISION)} (no = fp32)")


@dataclasses.dataclass
class TrainSettings:
    # Run folder: config.yaml, metrics.jsonl, tb/, checkpoints/, and the trained weights.
    output_dir: str = "runs/run"
    # Seed of everything random in the run (weights' init, data order, noise).
    seed: int = 0
    # Optimizer updates in total (global, not per process). Trainers with epochs: 0 = as many as `epochs`
    # give.
    max_updates: int = 100
    # Examples per micro-batch, per process (prompts for ReFL, pairs for the critic).
    batch_size: int = 2
    # Micro-batches per optimizer update, per process: an update sees
    # batch_size x gradient_accumulation x processes examples.
    gradient_accumulation: int = 1
    # Optimizer, a key of runkit.optim.OPTIMIZERS: "adamw" or "adamw8bit" (bitsandbytes, CUDA).
    optimizer: str = "adamw"
    # Peak learning rate.
    lr: float = 1e-5
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW betas.
    adam_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    # AdamW epsilon.
    adam_eps: float = 1e-8
    # Clip the global gradient norm to this; 0 = no clipping.
    max_grad_norm: float = 0.0
    # LR schedule after the warm-up, a key of runkit.schedules.LR_SCHEDULES: constant, cosine, linear.
    lr_schedule: str = "constant"
    # Linear warm-up length, in updates.
    warmup_updates: int = 0
    # "no", "fp16" or "bf16": autocast dtype (and the frozen weights' dtype); trained tensors stay fp32.
    mixed_precision: str = "no"
    # Recompute activations in backward (less memory, about one more forward pass).
    gradient_checkpointing: bool = False
    # Log scalars every this many updates.
    log_every: int = 10
    # "tensorboard" (scalars and images under output_dir/tb, plus metrics.jsonl) or "none" (metrics.jsonl).
    log_with: str = "tensorboard"
    # Validate every this many updates and at the end; 0 = once per epoch (trainers without epochs: at the
    # end).
    validate_every: int = 0
    # Write a resumable checkpoint every this many updates and at the end; 0 = once per epoch (trainers
    # without epochs: at the end).
    checkpoint_every: int = 0
    # Keep this many newest checkpoints; 0 keeps all.
    checkpoints_keep: int = 2
    # "latest" (the newest checkpoint under output_dir/checkpoints, or a fresh start if none) or a
    # checkpoint folder; empty starts fresh. `--resume` on the command line sets it.
    resume: str = ""
    # An earlier run of this trainer whose trained weights this run starts from: its run folder (its final
    # output), one of its checkpoints (<run>/checkpoints/update-N), or that output itself (a critic/ or lora/
    # folder); "" = start fresh. Only the weights: the optimizer, the LR schedule and the update count start
    # anew (to continue an interrupted run, use `resume`).
    init_from: str = ""

    def check(self) -> None:
        """The invariants every trainer needs; raises ConfigError naming the key."""
        from runkit.optim import OPTIMIZERS
        from runkit.schedules import LR_SCHEDULES

        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ConfigError("train.batch_size and train.gradient_accumulation must be >= 1")
        if self.max_updates < 0:
            raise ConfigError("train.max_updates must be >= 0")
        if not 0 <= self.lr < math.inf:  # also refuses NaN and inf; 0 is a frozen control run
            raise ConfigError(f"train.lr must be >= 0 and finite, got {self.lr}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1) (e.g. [0.9, 0.999]), got "
                              f"{self.adam_betas}")
        if not 0 < self.adam_eps < math.inf or not 0 <= self.weight_decay < math.inf \
                or not 0 <= self.max_grad_norm < math.inf:
            raise ConfigError(f"train.adam_eps must be > 0, train.weight_decay and train.max_grad_norm >= 0 "
                              f"(0 = no clipping), all finite; got {self.adam_eps}, {self.weight_decay}, "
                              f"{self.max_grad_norm}")
        never_negative = {k: getattr(self, k) for k in ("warmup_updates", "validate_every",
                                                        "checkpoint_every", "checkpoints_keep")}
        negative = [f"train.{k}={v}" for k, v in never_negative.items() if v < 0]
        if negative:
            raise ConfigError(f"{', '.join(negative)}: must be >= 0 (0 = the default schedule: see each key)")
        if self.seed < 0:
            raise ConfigError(f"train.seed must be >= 0 (torch and numpy take no negative seed), got "
                              f"{self.seed}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1 (updates between log lines), got "
                              f"{self.log_every}")
        check_mixed_precision(self.mixed_precision, "train.mixed_precision")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r}; choose one of {sorted(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.log_with not in ("tensorboard", "none"):
            raise ConfigError(f"train.log_with={self.log_with!r}; choose tensorboard or none")


def _renamed_message(cls: type, data: dict) -> str | None:
    renamed: dict[str, str] = getattr(cls, "RENAMED", {})

    def walk(node: dict, prefix: str):
        for k, v in node.items():
            key = prefix + str(k)
            if key in renamed:
                yield key
            if isinstance(v, dict):
                yield from walk(v, key + ".")

    hits = list(walk(data, ""))
    if not hits:
        return None
    return "; ".join(f"{k} was renamed: use {renamed[k]}" if "." in renamed[k] and " " not in renamed[k]
                     else f"{k} is gone: {renamed[k]}" for k in hits)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as err:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from err
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from err
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys under '{prefix.rstrip('.') or '<root>'}' are: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err
    return obj


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only true/false are bools, so `mixed_precision: no` stays the string
    "no" (YAML 1.1 reads no/yes/on/off as bools); and a key written twice in one mapping is refused (PyYAML
    keeps the last silently: two `train:` blocks would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"key {key!r} is written twice in one mapping (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}); keep one (merge the two blocks)")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_yaml(text: str) -> Any:
    """A config file's or an override's YAML, with true/false alone as booleans."""
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> dict:
    """`a.b=c` -> {'a': {'b': c}} with c parsed as YAML (so numbers, bools and lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = (),
                labels: dict[str, str] | None = None) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then each `a.b=c` override, validated. An error names
    the override as `--set a.b=c`, or as `labels[override]` (how the user wrote it, e.g. a flag)."""
    data: dict = to_dict(cls())
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; name the YAML file (e.g. "
                              "configs/refl_toy.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first key.
            loaded = read_yaml(path.read_text(encoding="utf-8-sig")) or {}
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        if message := _renamed_message(cls, loaded):
            raise ConfigError(f"{path}: {message}")
        try:
            _from_dict(cls, _merge(data, loaded))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        data = _merge(data, loaded)
    return _apply_overrides(cls, data, overrides, labels)


def override(cfg: T, overrides: list[str] = ()) -> T:
    """`cfg` with `a.b=c` overrides applied, validated like load_config's."""
    return _apply_overrides(type(cfg), to_dict(cfg), overrides)


def _apply_overrides(cls: type[T], data: dict, overrides, labels: dict[str, str] | None = None) -> T:
    """Each `a.b=c` merged into `data` in turn, checked as it comes (the error names that override)."""
    for text in overrides or ():
        label = (labels or {}).get(text, f"--set {text}")
        update = parse_override(text)
        if message := _renamed_message(cls, update):
            raise ConfigError(f"{label}: {message}")
        data = _merge(data, update)
        try:
            _from_dict(cls, data)
        except ConfigError as err:
            raise ConfigError(f"{label}: {err}") from err
    return _from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically) beside a run's outputs."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()
    return atomic_write_bytes(path, lambda f: f.write(text))


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: data}


def changed_settings(saved: str | os.PathLike, cfg: Any, ignore: tuple[str, ...] = ("train.resume",)
                     ) -> list[str]:
    """The settings of `cfg` that differ from a run's saved config file (`key: old -> new`, keys absent on
    either side included); none when there is no saved file. What a resumed run says it changed."""
    path = Path(saved)
    if not path.is_file():
        return []
    old, new = _leaves(read_yaml(path.read_text()) or {}), _leaves(to_dict(cfg))
    return [f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
            for key in sorted(set(old) | set(new)) if key not in ignore and old.get(key) != new.get(key)]


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source (the `#` lines above it, or the one after it on its line):
    the help text of its command-line flag, and what the vocabulary test reads."""
    import inspect
    import re

    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            match = re.match(r"\s{4}(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
            if match and match.group(1) in {f.name for f in dataclasses.fields(klass)}:
                text = " ".join(above) or (match.group(2) or "").strip()
                comments[match.group(1)] = text or comments.get(match.group(1), "")
            above = []
    return comments


def _key_type(cls: type, key: str) -> tuple[Any, str, Any]:
    """(type, comment, default) of a dotted key of `cls`."""
    node, parts = cls, key.split(".")
    default: Any = cls()
    for i, part in enumerate(parts):
        hints = _field_types(node)
        if part not in hints:
            raise KeyError(f"{cls.__name__} has no key {'.'.join(parts[: i + 1])}")
        comment = field_comments(node).get(part, "")
        default = getattr(default, part)
        node = hints[part]
    return node, comment, default


# Flags spelled otherwise than their key, the same in every command (docs/vocabulary.md).
SHORT_FLAGS = {"output_dir": "--out", "train.output_dir": "--out", "train.resume": "--resume",
               "model.name": "--model", "model.vae": "--vae"}


def flag_for(key: str) -> str:
    """The command-line spelling of a config key: its own name with dashes, or its short flag."""
    return SHORT_FLAGS.get(key, "--" + key.rsplit(".", 1)[-1].replace("_", "-"))


def config_parser(cls: type, description: str | None, *, positional: tuple[str, ...] = (),
                  flags: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A command's parser over its config class `cls`: --config FILE, --set KEY=VALUE and, for each key in
    `positional` and `flags`, an argument that sets that key (a flag is spelled as its key, see flag_for).
    Flags apply before --set, so an explicit --set wins; `parse_config_args` reads the result and refuses
    a key of `required` left empty (from a flag, the file or --set alike)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    keys: dict[str, str] = {}
    for key in (*positional, *flags):
        tp, comment, default = _key_type(cls, key)
        origin = typing.get_origin(tp)
        kwargs: dict[str, Any] = {"help": f"{comment} ({key}; default: {default!r})".replace("%", "%%")}
        if tp is bool:
            kwargs.update(action="store_const", const=True, default=None)
        elif origin in (list, tuple):
            kwargs.update(action="extend", nargs="+", default=None)  # a repeated flag adds to the list
        if key in positional:
            dest = key.replace(".", "__")
            parser.add_argument(dest, metavar=key.rsplit(".", 1)[-1].upper(), **kwargs)
        else:
            dest = "key__" + key.replace(".", "__")
            parser.add_argument(flag_for(key), dest=dest, metavar=key.rsplit(".", 1)[-1].upper(),
                                **({"default": None} | kwargs))
        keys[dest] = key
    parser.set_defaults(_config_class=cls, _config_keys=keys, _config_required=required)
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, first: list[str] = ()
                      ) -> tuple[Any, argparse.Namespace]:
    """(the resolved config, the parsed arguments) of a parser made by `config_parser`: the defaults, the
    --config file, the overrides in `first` (a command's preset, e.g. the demo's --quick), the flags, then
    each --set."""
    args = parser.parse_args(argv)
    cls = args._config_class
    overrides, labels = [], {}
    for dest, key in args._config_keys.items():
        value = getattr(args, dest)
        if value is None:
            continue
        tp = _key_type(cls, key)[0]
        # JSON is YAML: a string stays a string whatever it looks like ("oracle:", "1e-4", "no").
        as_text = json.dumps(value) if tp is str or typing.get_origin(tp) in (list, tuple) else str(value)
        overrides.append(f"{key}={as_text}")
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        labels[overrides[-1]] = (f"{flag_for(key)} {shown}" if dest.startswith("key__")
                                 else f"{key.rsplit('.', 1)[-1]} {shown}")
    cfg = load_config(cls, args.config, [*first, *overrides, *config_overrides(args)], labels)
    missing = [key for key in args._config_required if not _key_value(cfg, key)]
    if missing:
        raise ConfigError("missing " + ", ".join(f"{key} ({flag_for(key)})" for key in missing))
    return cfg, args


def _key_value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """--config FILE and --set KEY=VALUE (repeatable)."""
    parser.add_argument("--config", type=str, default=None, help="experiment YAML (overrides only)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=1e-4 (repeatable; applied after the flags)",
    )


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides."""
    return list(args.overrides)


def check_device_precision(device, mixed_precision: str, key: str = "mixed_precision") -> None:
    """The one rule where a device meets a precision: fp16 is refused on the CPU (torch runs it there slowly
    or not at all, and accelerate's loss scaler is for GPUs: the run went on with three warnings); bf16 and
    no (fp32) run anywhere. Raises one line naming `key` and the fix."""
    import torch

    if mixed_precision == "fp16" and torch.device(device).type == "cpu":
        raise ConfigError(f"{key}=fp16 on the CPU: fp16 runs on a GPU only; use bf16 (or no = fp32) on the "
                          "CPU, or run on a GPU")


def resolve_device(device: str | None, mixed_precision: str = "no", key: str = "mixed_precision") -> str:
    """A config's `device`: as given, or "" (and None) = CUDA when there is one, else the CPU; checked
    before any work: a name torch knows, a CUDA device that is there, and the `mixed_precision` it will run
    in (`check_device_precision`, naming `key`)."""
    import torch

    if not device:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device name; use cuda, cuda:N, cpu (or mps), or leave "
                          "it empty for CUDA when there is one") from None
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA device is visible here; use cpu, or leave device "
                          "empty to use CUDA when there is one")
    if kind.type == "cuda" and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise ConfigError(f"device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                          "visible")
    check_device_precision(device, mixed_precision, key)
    return device
