"""Procedural renderer: a `Scene` -> a small anti-aliased RGB image.

Every render draws its continuous details (exact centroid, extent, colour jitter, background
texture) from the caller's generator, so two renders of one prompt differ the way two photos of
one subject do. The shape is rasterised at 4x and box-downscaled (anti-aliasing), then composited
over a textured background in numpy; 20k renders take a few seconds.

`render_candidates` adds a quality knob that makes some renders better and some worse in the ways
the community cares about (oracle.py): these stand in for a generator's samples until the toy
Stable Diffusion exists, so that remix pairs carry a learnable signal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from toyworld.world import ANCHORS, BACKGROUNDS, COLOURS, SHAPES, SIZE_RANGE, Scene, compatible

SUPERSAMPLE = 4  # rasterise at 4x the output side, then box-filter down: 16 coverage samples per pixel


@dataclass(frozen=True)
class Look:
    """The continuous choices behind one render (everything the scene leaves open)."""

    cx: float  # centroid x, fraction of the image side
    cy: float  # centroid y, fraction of the image side (down is +)
    extent: float  # shape width (circle diameter, square side, triangle base), fraction of the side
    fg: tuple[float, float, float]  # shape colour, RGB 0-255
    bg: tuple[float, float, float]  # mean background colour, RGB 0-255
    texture: float  # background texture amplitude, RGB units (0 = flat)
    blur: float  # Gaussian blur radius of the final image in pixels (0 = sharp)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _saturate(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Scale the colour's distance from its own grey level (factor < 1 fades, > 1 makes vivid)."""
    grey = _luma(rgb)
    return np.clip(grey + (rgb - grey) * factor, 0, 255)


def sample_look(scene: Scene, rng: np.random.Generator, quality: float | None = None) -> Look:
    """A random look for `scene`; `quality` in [0, 1] shifts it (0.5 = a plain render, None = plain).

    Each aspect draws its own goodness around `quality`, so a good candidate is usually, not
    always, better on every aspect (as with real samples).
    """
    fg = np.asarray(COLOURS[scene.colour], dtype=float) + rng.normal(0, 6, 3)
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=float) + rng.normal(0, 5, 3)
    ax, ay = ANCHORS[scene.position]
    lo, hi = SIZE_RANGE[scene.size]
    extent = rng.uniform(lo, hi)
    dx, dy = rng.uniform(-0.05, 0.05, 2)
    texture = rng.uniform(0, 10)
    blur = 0.0
    if quality is not None:
        g = np.clip(quality + rng.normal(0, 0.25, 6), 0, 1)  # per-aspect goodness
        # Vividness: faded (-45%) at g=0, boosted (+30%) at g=1, about unchanged at g=0.5.
        fg = _saturate(fg, 0.55 + 0.75 * g[0])
        # Contrast: below middling quality the shape's colour bleeds toward the background.
        fg = fg + max(0.0, 0.5 - g[1]) * 0.9 * (bg - fg)
        # Placement: the centroid wanders further from its anchor as quality drops.
        dx, dy = np.array([dx, dy]) * (1.6 - 1.4 * g[2]) + rng.normal(0, 0.05 * (1 - g[2]) ** 2, 2)
        # Size: from 25% smaller to 15% larger than drawn, never leaving the stated size class.
        extent = float(np.clip(extent * (0.75 + 0.4 * g[3]), lo * 0.7, hi * 1.12))
        blur = 2.0 * max(0.0, 0.6 - g[4])
        texture = 2.0 + 20.0 * (1.0 - g[5]) ** 2
    return Look(cx=ax + float(dx), cy=ay + float(dy), extent=float(extent),
                fg=tuple(np.clip(fg, 0, 255).tolist()), bg=tuple(np.clip(bg, 0, 255).tolist()),
                texture=float(texture), blur=float(blur))


def shape_coverage(shape: str, look: Look, size: int) -> np.ndarray:
    """Anti-aliased coverage of the shape: (size, size) float32 in [0, 1]."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, w = look.cx * big, look.cy * big, look.extent * big
    if shape == "circle":
        draw.ellipse([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], fill=255)
    elif shape == "square":
        draw.rectangle([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], fill=255)
    elif shape == "triangle":
        # Equilateral, pointing up, placed by its centroid (2/3 of the height below the apex).
        h = w * math.sqrt(3) / 2
        draw.polygon([(cx, cy - 2 * h / 3), (cx - w / 2, cy + h / 3), (cx + w / 2, cy + h / 3)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0  # (size, size)


def draw_look(shape: str, look: Look, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Composite the shape over a textured background: (size, size, 3) uint8."""
    alpha = shape_coverage(shape, look, size)[..., None]  # (S, S, 1)
    # Background texture: a soft linear gradient in a random direction plus fine grain.
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    grad = math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None]  # (S, S)
    grain = rng.normal(0, 0.5, (size, size, 3)).astype(np.float32)  # (S, S, 3)
    bg = np.asarray(look.bg, dtype=np.float32) + look.texture * (grad[..., None] + grain)  # (S, S, 3)
    fg = np.asarray(look.fg, dtype=np.float32) + rng.normal(0, 1.5, (size, size, 3)).astype(np.float32)
    img = bg * (1 - alpha) + fg * alpha  # (S, S, 3)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if look.blur > 0.05:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(look.blur)))
    return out


def render_array(scene: Scene, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One plain render as (size, size, 3) uint8 (the fast path behind `datasets.render_dataset`)."""
    return draw_look(scene.shape, sample_look(scene, rng), rng, size)


def render(scene: Scene, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One plain render of `scene` as a PIL RGB image."""
    return Image.fromarray(render_array(scene, rng, size))


def render_candidates(scene: Scene, rng: np.random.Generator, n: int, size: int = 32,
                      wrong_rate: float = 0.15) -> list[Image.Image]:
    """`n` renders of varied quality, standing in for a generator's samples of one prompt.

    Quality is drawn uniformly per candidate; the worse a candidate, the likelier
    (up to `wrong_rate`) it also gets the colour or the shape wrong, as weak generators do.
    """
    out = []
    for _ in range(n):
        quality = float(rng.uniform(0, 1))
        drawn = scene
        if rng.uniform() < wrong_rate * (1 - quality):
            if rng.uniform() < 0.6:
                others = [c for c in COLOURS if c != scene.colour and compatible(c, scene.background)]
                drawn = replace(scene, colour=str(rng.choice(others)))
            else:
                drawn = replace(scene, shape=str(rng.choice([s for s in SHAPES if s != scene.shape])))
        look = sample_look(drawn, rng, quality=quality)
        out.append(Image.fromarray(draw_look(drawn.shape, look, rng, size)))
    return out
