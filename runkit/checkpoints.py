"""Resumable checkpoints of both trainers, one layout: `<run>/checkpoints/update-NNNNNN/`.

Inside: accelerate's `save_state` (prepared models and optimizers, registered schedulers and custom
objects, the loss scaler, every process's RNG state), the trainer's own files (the critic, or the
LoRA in diffusers format) and `state.json` (the update count and the loop position). `state.json`
is written last and the folder appears by one rename, so a folder with it is complete.
`--resume latest` picks the newest complete one; a run without any starts fresh.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from runkit.files import replace_dir, write_json, writing

logger = logging.getLogger(__name__)

PREFIX = "update-"


def checkpoint_name(update: int) -> str:
    return f"{PREFIX}{update:06d}"


def checkpoint_dirs(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = [p for p in (Path(out) / "checkpoints").glob(PREFIX + "*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(out: str | os.PathLike, resume: str | None) -> Path | None:
    """What `train.resume` names: None/"" (start fresh), "latest" (None if the run has none yet) or a path.

    Starting fresh in a folder that holds an earlier run's checkpoints is refused (FileExistsError): the
    new run's checkpoints would sit beside the old ones, and a later `--resume latest` could continue the
    old run."""
    if not resume:
        found = checkpoint_dirs(out)
        if found:
            raise FileExistsError(f"{out} holds checkpoints of an earlier run (up to {found[-1].name}); "
                                  "continue it with --resume latest, or start fresh in another output_dir "
                                  "(or remove that one)")
        return None
    if resume == "latest":
        found = checkpoint_dirs(out)
        if not found:
            logger.info("resume latest: no checkpoint under %s yet, starting fresh",
                        Path(out) / "checkpoints")
            return None
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"resume {path}: not a complete checkpoint directory (no state.json); use "
                                f"'latest' or a folder like <run>/checkpoints/{checkpoint_name(8)}")
    return path


def init_weights(init_from: str | os.PathLike, output: str, holds: Callable[[Path], bool],
                 what: str) -> Path:
    """The folder of trained weights that `train.init_from` names: the folder itself when it holds them
    (`holds`), else its `output` folder, which a run folder holds (its final weights) and so does each of its
    checkpoints. FileNotFoundError naming the three kinds of folder otherwise, before any model is built."""
    path = Path(init_from)
    for candidate in (path, path / output):
        if candidate.is_dir() and holds(candidate):
            return candidate
    raise FileNotFoundError(f"train.init_from={init_from}: holds no {what}; name an earlier run's folder, "
                            f"one of its checkpoints (<run>/checkpoints/{checkpoint_name(8)}) or its "
                            f"{output}/ folder")


def save_checkpoint(accelerator, out: str | os.PathLike, state: dict, keep: int,
                    write_files: Callable[[Path], None] | None = None) -> Path:
    """Every process calls this. `state["update"]` names the folder; `write_files(folder)` (main process)
    adds the trainer's own files; the `keep` newest checkpoints stay (0 keeps all)."""
    root = Path(out) / "checkpoints"
    final = root / checkpoint_name(state["update"])
    tmp = root / f".{final.name}.tmp"  # one name every process knows
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with writing(final):
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                if write_files is not None:
                    write_files(tmp)
                write_json(tmp / "state.json", state)
                replace_dir(tmp, final)
    except BaseException:
        # A half-written checkpoint would keep a full disk full until the next run; the earlier ones stay.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        for old in checkpoint_dirs(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final


def rewrite_state(checkpoint: Path, state: dict) -> None:
    """Main process: replace a complete checkpoint's state.json (what happened after it was written in the
    same update, e.g. a validation's selection), atomically, so the folder stays complete."""
    write_json(checkpoint / "state.json", state)


def load_checkpoint(accelerator, path: str | os.PathLike, changed: list[str] = ()) -> dict:
    """Restore what save_state saved (same registration order as when saving); returns state.json.

    `changed` lists the settings changed since the checkpoint's run started (`runkit.config.
    changed_settings`): logged on success, and named when the checkpoint no longer fits (a LoRA rank, a
    model, an optimizer changed), which is refused with a ValueError instead of torch's tensor listing."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        first = " ".join(lines[:2])[:300] if lines[0].endswith(":") else lines[0][:300]  # torch: a heading
        since = ("; settings changed since that run: " + ", ".join(changed)) if changed else ""
        raise ValueError(f"checkpoint {path} does not fit this run's model or optimizer ({first}){since}. "
                         "Resume with the run's own settings for these, or start fresh in another "
                         "output_dir") from err
    if changed:
        logger.warning("resuming %s with settings changed since: %s", path, ", ".join(changed))
    return json.loads((Path(path) / "state.json").read_text())
