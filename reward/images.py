"""Image files to 8-bit RGB pixels: the one decoder of the project.

Training, scoring (a critic's and the standard models'), the checking pass and the toy world all decode
through `decode_image`, so an image has the same pixels wherever it is read, and an image PIL opens but
cannot honestly turn into 8-bit RGB is refused with the reason, never clipped or guessed:

- 16-bit greyscale (`I;16`, `I;16B`, ...) scales by its bit depth (x 255 / 65535), not by its own
  min/max; 32-bit `I` is read as 16-bit when its values fit 0-65535, and refused otherwise;
- 32-bit float `F` is read as [0, 1] (the float convention) and refused when its values leave [0, 1];
- alpha (`RGBA`, `LA`, `PA`, a palette or greyscale with a transparent colour) is composited over
  `ALPHA_BACKGROUND`, as a viewer on a white page shows it;
- every other mode (`P`, `1`, `L`, `CMYK`, `YCbCr`, `LAB`, `HSV`, ...) goes through PIL's own conversion;
- a truncated file is refused even when another library set PIL's `LOAD_TRUNCATED_IMAGES`.

This module imports nothing from the project, so both `reward.model` and `reward.data` can use it.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageFile

# What a transparent pixel shows: white, as on a web page.
ALPHA_BACKGROUND = (255, 255, 255)
# Tolerance on [0, 1] for float images (rounding in the program that wrote them).
FLOAT_SLACK = 1e-3

ImageSource = Union[str, os.PathLike, bytes, bytearray, dict, Image.Image]


class ImageError(ValueError):
    """An image that cannot be decoded, or not honestly turned into 8-bit RGB; the message says why."""


def describe(ref) -> str:
    """How a message names an image: its path, or <bytes> for encoded bytes held in a table."""
    if isinstance(ref, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(ref, dict):
        return str(ref.get("path") or "<bytes>")
    return str(ref)


def image_bytes(ref) -> bytes:
    """The encoded bytes of a path, of bytes, or of a `datasets` Image cell ({"bytes", "path"}).

    Raises FileNotFoundError for a missing file and ImageError for an empty cell."""
    if ref is None:
        raise ImageError("image is missing (an empty cell)")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, dict):
        if ref.get("bytes") is not None:
            return bytes(ref["bytes"])
        if not ref.get("path"):
            raise ImageError("image is missing (a datasets Image cell with neither bytes nor path)")
        ref = ref["path"]
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"image {ref} does not exist")
    return path.read_bytes()


def decode_image(ref: ImageSource, name: str | None = None) -> Image.Image:
    """Any image source (path, encoded bytes, `datasets` cell or PIL image) -> an 8-bit RGB PIL image.

    `name` is how errors name the image (default: `describe(ref)`). Raises FileNotFoundError for a missing
    file and ImageError for a corrupt, truncated or refused one."""
    name = name or describe(ref)
    if isinstance(ref, Image.Image):
        return _to_rgb(ref, name)
    data = image_bytes(ref)
    try:
        with Image.open(io.BytesIO(data)) as im, _strict_truncation():
            im.load()
            return _to_rgb(im, name)
    except ImageError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageError(f"image {name} is corrupt or truncated ({err})") from err


@contextmanager
def _strict_truncation():
    """PIL fills a truncated file with grey when `LOAD_TRUNCATED_IMAGES` is set (some libraries set it for
    the whole process); a pairs set must not train on grey, so it is off while we load, then restored."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """One opened image in any mode -> 8-bit RGB with its real values (see the module docstring)."""
    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        return _grey(_from_integers(np.asarray(im), im.mode, name))
    if im.mode == "F":
        return _grey(_from_float(np.asarray(im), name))
    if "A" in im.mode or "a" in im.mode or "transparency" in im.info:
        return _over_background(_convert(im, "RGBA", name))
    return im.copy() if im.mode == "RGB" else _convert(im, "RGB", name)


def _convert(im: Image.Image, mode: str, name: str) -> Image.Image:
    try:
        return im.convert(mode)
    except ValueError as err:  # "conversion from La to L not supported"
        raise ImageError(f"image {name} has mode {im.mode}, which cannot be read as RGB ({err}); "
                         "re-export it as RGB") from err


def _grey(values: np.ndarray) -> Image.Image:
    """(H, W) floats on the 0-255 scale -> RGB, each channel the same grey."""
    grey = np.rint(values).astype(np.uint8)  # (H, W)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))  # (H, W, 3)


def _from_integers(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16-bit data scaled by its bit depth. Mode I holds 32-bit integers: 16-bit data (PNG, TIFF) when it
    fits 0..65535; anything else has no known bit depth to scale by."""
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi > 65535:
        raise ImageError(f"image {name} has mode {mode} (integer) with values {lo}..{hi}, outside the 16-bit "
                         "range 0..65535, so its bit depth is unknown; re-export it as 8- or 16-bit")
    return values.astype(np.float64) * (255.0 / 65535.0)


def _from_float(values: np.ndarray, name: str) -> np.ndarray:
    lo, hi = float(np.min(values)), float(np.max(values))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -FLOAT_SLACK or hi > 1 + FLOAT_SLACK:
        raise ImageError(f"image {name} has mode F (32-bit float) with values {lo:g}..{hi:g}, outside [0, "
                         "1], so its range is unknown; re-export it as 8- or 16-bit")
    return np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0


def _over_background(rgba: Image.Image) -> Image.Image:
    """Straight (non-premultiplied) alpha composited over `ALPHA_BACKGROUND`."""
    arr = np.asarray(rgba, dtype=np.float64)  # (H, W, 4)
    alpha = arr[..., 3:] / 255.0  # (H, W, 1)
    out = arr[..., :3] * alpha + np.asarray(ALPHA_BACKGROUND, dtype=np.float64) * (1.0 - alpha)  # (H, W, 3)
    return Image.fromarray(np.rint(out).astype(np.uint8))
