"""Read a toy-world scene back from pixels: colour, shape, background, size and position.

The reading makes no use of how the renderer works inside, only of what the world promises (one
shape on a background that is roughly plain), so it also reads generated images that are roughly
right:
1. fit the background as a plane per channel to the image border (handles gradients), robustly;
2. the shape colour is the median of the pixels furthest from that background;
3. a soft coverage alpha per pixel projects each pixel onto the background -> shape colour line,
   restricted to the largest connected blob (so background grain elsewhere adds nothing);
4. geometry from alpha: area, soft width/height (sum over columns/rows of the max coverage),
   fill = area / (width * height) is about 1 for squares, pi/4 for circles, 1/2 for triangles.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from toyworld.world import ANCHORS, ATTRIBUTES, BACKGROUNDS, COLOURS, SIZE_THRESHOLD, Scene, parse_prompt

MAIN_ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "background")
# Fill-ratio cut points between triangle (0.5; up to 0.65 when small and pixelated), circle (0.785)
# and square (1.0; down to 0.94 when small).
FILL_CIRCLE_MIN = 0.70
FILL_SQUARE_MIN = 0.87
# Below this colour distance (RGB units) from the background nothing counts as a shape.
MIN_SHAPE_SIGNAL = 20.0

_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)  # (8, 3)
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)  # (7, 3)


@dataclass
class Reading:
    """What the pixels say; fractions are of the image side, colours RGB 0-255."""

    found: bool  # a shape stands out from the background at all
    fg: np.ndarray  # (3,) shape colour (median of its core)
    bg: np.ndarray  # (3,) background colour at the image centre (plane fit)
    bg_noise: float  # std of the border's residual around the fitted plane, RGB units
    area: float  # soft area, fraction of the image
    width: float  # soft width, fraction of the side
    height: float  # soft height, fraction of the side
    cx: float  # coverage-weighted centroid x
    cy: float  # coverage-weighted centroid y
    sharpness: float  # sum |grad alpha|^2 / sum |grad alpha|: about 0.7-1 for crisp edges, lower when blurred
    colour: str  # nearest named shape colour
    background: str  # nearest named background
    shape: str  # from the fill ratio
    size: str  # "small" / "large" from the extent
    position: str  # nearest anchor to the centroid

    @property
    def extent(self) -> float:
        return max(self.width, self.height)

    @property
    def fill(self) -> float:
        return self.area / max(self.width * self.height, 1e-6)


def to_array(image) -> np.ndarray:
    """A PIL image or an (H, W, 3) array (uint8, or float in [0, 1]) -> (H, W, 3) float32 in 0-255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return np.clip(arr.astype(np.float32), 0, 1) * 255.0


def _border_mask(h: int, w: int, k: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[:k], m[-k:], m[:, :k], m[:, -k:] = True, True, True, True
    return m


def _fit_background(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Plane per channel fitted to the 2-px border, refitted without outliers (shape pixels)."""
    h, w, _ = x.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    design = np.stack([np.ones_like(xx), xx / w - 0.5, yy / h - 0.5], -1)  # (H, W, 3)
    keep = _border_mask(h, w, 2)
    resid = None
    for _ in range(2):
        a = design[keep]  # (n, 3)
        coef, *_ = np.linalg.lstsq(a, x[keep], rcond=None)  # (3 basis, 3 channels)
        plane = design @ coef  # (H, W, 3)
        resid = np.linalg.norm(x - plane, axis=-1)  # (H, W)
        border = _border_mask(h, w, 2)
        cut = max(3.0 * float(np.median(resid[border])), 12.0)
        keep = border & (resid < cut)
        if keep.sum() < 12:  # the shape covers almost the whole border: keep the first fit
            break
    noise = float(np.std((x - plane)[keep])) if keep.any() else 0.0
    return plane, noise


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (an iterative flood fill; images are tiny)."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                    label[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _nearest(rgb: np.ndarray, names: list[str], table: np.ndarray) -> str:
    return names[int(np.argmin(np.linalg.norm(table - rgb, axis=-1)))]


def read_image(image) -> Reading:
    """Measure one image (PIL or (H, W, 3) array) and name what it shows."""
    x = to_array(image)  # (H, W, 3)
    h, w, _ = x.shape
    plane, noise = _fit_background(x)
    bg = plane[h // 2, w // 2]
    background = _nearest(bg, _BG_NAMES, _BG_RGB)
    diff = x - plane  # (H, W, 3)
    dist = np.linalg.norm(diff, axis=-1)  # (H, W)
    # The shape's core: the pixels furthest from the background (top 1%, at least 4 px, then all
    # within 70% of that level), robust to anti-aliased edges and to a blurred rim.
    top = float(np.sort(dist.ravel())[-max(4, dist.size // 100)])
    empty = Reading(False, np.zeros(3), bg, noise, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, "", background, "", "", "")
    if top < MIN_SHAPE_SIGNAL:
        return empty
    core = dist >= 0.7 * top
    fg = np.median(x[core], axis=0)  # (3,)
    direction = fg[None, None, :] - plane  # (H, W, 3) background -> shape colour, per pixel
    alpha = np.clip((diff * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1.0), 0, 1)  # (H, W)
    blob = _largest_blob(alpha > 0.5)
    if not blob.any():
        return empty
    alpha = np.where(_dilate(_dilate(blob)), alpha, 0.0)  # (H, W) coverage of the main blob only
    area = float(alpha.sum())
    width = float(alpha.max(axis=0).sum())
    height = float(alpha.max(axis=1).sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cx = float((alpha * (xs + 0.5)).sum() / area) / w
    cy = float((alpha * (ys + 0.5)).sum() / area) / h
    gy, gx = np.gradient(alpha)
    grad = np.hypot(gx, gy)
    sharpness = float((grad**2).sum() / max(grad.sum(), 1e-6))
    fill = area / max(width * height, 1e-6)
    shape = "square" if fill >= FILL_SQUARE_MIN else "circle" if fill >= FILL_CIRCLE_MIN else "triangle"
    extent = max(width / w, height / h)
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    return Reading(
        found=True, fg=fg, bg=bg, bg_noise=noise, area=area / (h * w), width=width / w, height=height / h,
        cx=cx, cy=cy, sharpness=sharpness, colour=_nearest(fg, _COLOUR_NAMES, _COLOUR_RGB),
        background=background, shape=shape, size="large" if extent >= SIZE_THRESHOLD else "small",
        position=position,
    )


def check_reading(reading: Reading, scene: Scene) -> dict[str, bool]:
    return {attr: bool(reading.found or attr == "background")
            and getattr(reading, attr) == getattr(scene, attr)
            for attr in ATTRIBUTES}


def check(image, scene: Scene | str) -> dict[str, bool]:
    """Per-attribute agreement between an image and a scene (or its prompt)."""
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    return check_reading(read_image(image), scene)


def _as_list(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)  # (N, H, W, 3) -> N x (H, W, 3)
    return list(images)


def prompt_fidelity(images, prompts: Sequence[str],
                    attributes: Sequence[str] = MAIN_ATTRIBUTES) -> float:
    """Share of images whose `attributes` (default shape, colour, background) all match their prompt."""
    items = _as_list(images)
    if len(items) != len(prompts):
        raise ValueError(f"{len(items)} images but {len(prompts)} prompts")
    if not items:
        raise ValueError("prompt_fidelity() needs at least one image")
    hits = [all(check(img, p)[a] for a in attributes) for img, p in zip(items, prompts)]
    return float(np.mean(hits))
