"""File mechanisms every package shares: atomic writes and content fingerprints.

- `atomic_write_bytes(path, write)` / `atomic_write_text` / `write_json`: readers never see half a file,
  and a crash leaves the old one.
- `atomic_dir(path)`: the same for a folder (a model, a LoRA, a checkpoint): fill the temp folder it
  yields; on success it replaces `path` in one rename.
- `content_hash(ref)`: what a cache is keyed by. A model, LoRA or critic retrained into the same folder
  gets a new hash, so results computed from the old files are never reused for the new ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
# (resolved path, size, mtime_ns) -> digest: a run hashes each large file once, however often it asks.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


# How a full disk or a failed write shows up from the writers the project uses: OSError from Python, a
# RuntimeError from torch.save's zip writer, a SafetensorError (an Exception) from safetensors.
_WRITE_FAILURE_MARKS = ("No space left", "StorageFull", "Disk quota", "unexpected pos", "PytorchStreamWriter",
                        "file write failed", "Error while serializing")


_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a failed write (a full disk, no permission) as an OSError that names `path` and the fix;
    other errors pass unchanged."""
    try:
        yield
    except Exception as err:
        text = str(err)
        code = getattr(err, "errno", None) if isinstance(err, OSError) else (
            errno.ENOSPC if any(mark in text for mark in _WRITE_FAILURE_MARKS) else None)
        if text.startswith("could not write ") or code not in _FULL | _DENIED:
            raise  # named already by an inner writer, or not a failed write
        fix = "free space there (or write elsewhere)" if code in _FULL else "make the folder writable"
        raise OSError(code, f"could not write {path}: {os.strerror(code)}; {fix} and run again") from err


def check_output_dir(path: str | os.PathLike, key: str) -> Path:
    """A run's folder, checked before any work and without creating it: a folder or nothing yet, inside a
    folder this user may write to. Raises one line naming `key` and the fix."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{key} {path} is a file; name a folder for the run")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{key} {path}: {parent} is a file, so no folder can be made under it; name "
                                 "another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{key} {path}: {parent} is not writable by this user; make it writable or "
                              "name another folder")
    return path


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(file_object)` into a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    with writing(path):
        return _atomic_write_bytes(path, write)


def _atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise survive the rename
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; when the block ends without error it becomes `path`
    (an existing `path` is replaced, with at most a moment where neither exists). On error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise survive the rename
    try:
        with writing(path):
            yield tmp
            replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst`."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finite_json(obj: Any) -> Any:
    """NaN / inf -> None, so the file is strict JSON (a browser's JSON.parse reads it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def paths_relative_to(obj: Any, root: str | os.PathLike) -> Any:
    """A copy of `obj` in which every string naming a path inside `root` (spelled from `root`, or absolute)
    is relative to `root`, so a run folder that is copied or moved names its own files, never the original's.
    Readers join such a path to the folder they read it from."""
    root = Path(root)
    prefix, resolved = str(root) + os.sep, root.resolve()

    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, os.PathLike):
            value = str(value)
        if not isinstance(value, str):
            return value
        if value == str(root):
            return "."
        if value.startswith(prefix):
            return value[len(prefix):]
        if os.path.isabs(value) and Path(value).resolve().is_relative_to(resolved):
            return str(Path(value).resolve().relative_to(resolved))
        return value

    return convert(obj)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Strict JSON (non-finite numbers as null), written atomically."""
    return atomic_write_text(path, json.dumps(finite_json(data), indent=2, allow_nan=False))


def file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def content_hash(ref: str | os.PathLike) -> str:
    """A fingerprint of what `ref` names: the bytes of a file, every file of a folder (names included,
    hidden temp files excluded), or, for a name that is no path (a preset, an open_clip name, a hub id),
    the name itself: those are fixed by their name and version."""
    if not str(ref):
        return "name:"
    path = Path(ref)
    if path.is_file():
        return "file:" + file_digest(path)
    if path.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"{rel.as_posix()}\0{file_digest(f)}\0".encode())
        return "dir:" + h.hexdigest()
    revision = _cached_hub_revision(str(ref))
    return "name:" + str(ref) + (f"@{revision}" if revision else "")


def _cached_hub_revision(ref: str) -> str | None:
    """The commit of a hub repo id's snapshot in the local cache (what from_pretrained would load)."""
    if ref.count("/") != 1 or ref.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True)).name
    except Exception:  # not cached, not a repo id, or no huggingface_hub: the name is all there is
        return None
