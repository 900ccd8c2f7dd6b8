"""The toy world's prompt grammar: scenes of one shape on a plain background.

A scene has five attributes (shape, colour, background, size, position); each maps to one short
phrase, so a prompt is "a large red circle at the left on a blue background" (11 BPE tokens, 13
with start/end, inside the toy CLIP's 16-token context). The palettes and the geometry (where
"left" is, how big "large" is) live here because the renderer draws them and the checker reads
them back; keeping one source means the two cannot drift apart.

Nothing here imports torch: the world, the renderer, the checker and the oracle run in any process.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The world's shipped models (the toy SD, the toy flow model, the toy CLIP), made by its pre-training scripts.
ASSETS = Path(__file__).resolve().parent / "assets"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Shape colours (RGB 0-255) as the renderer draws them before jitter. Not fully saturated on
# purpose: the community's taste (oracle.py) prefers vivid colours, so there is room to improve.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 45, 45),
    "orange": (235, 135, 35),
    "yellow": (230, 210, 50),
    "green": (50, 160, 70),
    "blue": (45, 85, 215),
    "purple": (135, 55, 180),
    "pink": (235, 125, 180),
    "white": (235, 235, 235),
}

# Background colours. "white" and "blue" share a name with a shape colour but are separate entries;
# a scene never puts a shape on a background it could not be told apart from (see `compatible`).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 26),
    "white": (240, 238, 230),
    "gray": (125, 125, 128),
    "blue": (40, 60, 140),
    "green": (35, 105, 55),
    "yellow": (225, 205, 95),
    "brown": (105, 70, 45),
}

SIZES: tuple[str, ...] = ("small", "large")
# Shape extent (bounding-box side for squares, diameter for circles, width for triangles) as a
# fraction of the image side, drawn uniformly in this range by the renderer.
SIZE_RANGE: dict[str, tuple[float, float]] = {"small": (0.20, 0.28), "large": (0.46, 0.56)}
# The checker calls a shape "large" above this extent: halfway between the two ranges.
SIZE_THRESHOLD: float = 0.37

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# Where the shape's centroid sits, as (x, y) fractions of the image side (y grows downward).
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.30, 0.50),
    "right": (0.70, 0.50),
    "top": (0.50, 0.30),
    "bottom": (0.50, 0.70),
    "center": (0.50, 0.50),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "at the left",
    "right": "at the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# A shape colour and a background closer than this (RGB euclidean) are never combined: the checker
# could not separate them and a viewer could hardly see the shape.
MIN_SHAPE_BG_DISTANCE: float = 95.0

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "background", "size", "position")


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES
    colour: str  # key of COLOURS (the shape's colour)
    background: str  # key of BACKGROUNDS
    size: str = "large"  # one of SIZES
    position: str = "center"  # one of POSITIONS

    def __post_init__(self):
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("background", self.background, tuple(BACKGROUNDS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"Scene.{name}={value!r} is not one of {allowed}")


def compatible(colour: str, background: str) -> bool:
    """Whether a `colour` shape is clearly visible on a `background` background."""
    a = np.asarray(COLOURS[colour], dtype=float)
    b = np.asarray(BACKGROUNDS[background], dtype=float)
    return colour != background and float(np.linalg.norm(a - b)) >= MIN_SHAPE_BG_DISTANCE


def all_scenes() -> list[Scene]:
    """Every valid scene, in a fixed order (the grammar's whole prompt space)."""
    return [
        Scene(shape, colour, bg, size, pos)
        for shape, colour, bg, size, pos in itertools.product(SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS)
        if compatible(colour, bg)
    ]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random valid scene (rejection sampling over incompatible colour pairs)."""
    while True:
        colour = str(rng.choice(list(COLOURS)))
        background = str(rng.choice(list(BACKGROUNDS)))
        if compatible(colour, background):
            break
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=colour,
        background=background,
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
    )


def scene_to_prompt(scene: Scene) -> str:
    return (f"a {scene.size} {scene.colour} {scene.shape} {POSITION_PHRASES[scene.position]} "
            f"on a {scene.background} background")


_PROMPT_RE = re.compile(
    r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<pos>at the \w+|in the center) "
    r"on a (?P<bg>\w+) background$"
)
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes; raises ValueError for text outside the grammar."""
    m = _PROMPT_RE.match(" ".join(prompt.lower().split()))
    if m is None or m["pos"] not in _PHRASE_TO_POSITION:
        raise ValueError(f"prompt {prompt!r} is not in the toy-world grammar "
                         f"(e.g. {scene_to_prompt(Scene('circle', 'red', 'blue'))!r})")
    return Scene(shape=m["shape"], colour=m["colour"], background=m["bg"], size=m["size"],
                 position=_PHRASE_TO_POSITION[m["pos"]])


def split_prompts(seed: int = 0, heldout_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): a fixed random split of the whole prompt space.

    Held-out prompts are whole prompts never used for training (critic, SD, ReFL), kept for
    evaluation. Same seed -> same split on every machine (numpy's PCG64 is platform-independent).
    """
    prompts = [scene_to_prompt(s) for s in all_scenes()]
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_held = max(1, round(heldout_fraction * len(prompts)))
    held = sorted(prompts[i] for i in order[:n_held])
    train = sorted(prompts[i] for i in order[n_held:])
    return train, held


# What the held-out prompts are used for. Each use gets its own third of the split, dealt round-robin from one
# fixed shuffle, and takes the first n of it: every use is a uniform random sample of the held-out prompt
# space, no two uses share a prompt, and one use's count never moves another's prompts. (Before, each use
# took an alphabetical slice of the sorted split: the comparison's 16 prompts were all large blue or green
# shapes, the validation's 8 all small yellow ones.)
HELDOUT_USES = ("oracle_pairs", "compare", "validation")


def heldout_prompts(use: str, n: int, seed: int = 0) -> list[str]:
    """`n` held-out prompts for `use` (one of HELDOUT_USES: the critic's oracle pairs, the comparison and the
    ablation, ReFL's validation): a fixed uniform random draw, disjoint from the other uses' draws."""
    if use not in HELDOUT_USES:
        raise ValueError(f"unknown held-out use {use!r}; choose one of {HELDOUT_USES}")
    held = split_prompts(seed)[1]
    order = np.random.default_rng([seed, 1]).permutation(len(held))
    share = [held[i] for i in order[HELDOUT_USES.index(use)::len(HELDOUT_USES)]]
    if not 0 <= n <= len(share):
        raise ValueError(f"{n} held-out prompts asked for {use}; it has {len(share)} (a third of the "
                         f"{len(held)} held-out prompts): ask for 0 to {len(share)}")
    return share[:n]
