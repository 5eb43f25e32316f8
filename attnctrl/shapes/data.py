"""Synthetic scenes of coloured shapes on a white 64×64 canvas, with captions.

Every scene has 1-3 non-overlapping objects (distinct (shape, colour) pairs); a two-object scene may
carry a spatial relation (``"left of"``, ``"right of"``, ``"above"``, ``"below"``) that its placement
satisfies (box centres). Rendering is exact: flat fills of :data:`COLORS`, no anti-aliasing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND",
    "COLORS",
    "GAP",
    "IMAGE_SIZE",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "VOCABULARY",
    "Scene",
    "ShapeObject",
    "caption_of",
    "parse_caption",
    "random_scene",
    "render",
    "samples",
]

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
}
SIZES = {"small": 16, "large": 26}  # bounding-box side in pixels
BACKGROUND = (255, 255, 255)
IMAGE_SIZE = 64
RELATIONS = ("left of", "right of", "above", "below")
GAP = 2  # minimum empty pixels between two boxes
_RELATION_WORDS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_MIN_OFFSET = 8  # a relation's box centres differ by at least this along its axis

#: Every word a caption of this module can contain (the embedded tokenizer's vocabulary).
VOCABULARY = (
    "a",
    "an",
    "and",
    "the",
    "to",
    "of",
    "left",
    "right",
    "above",
    "below",
    "small",
    "large",
    ",",
    *COLORS,
    *SHAPES,
)


@dataclass(frozen=True)
class ShapeObject:
    """One shape: ``box`` is ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive."""

    shape: str
    color: str
    size: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    caption: str
    relation: str | None = None  # relation of objects[0] to objects[1]


def _mask(shape: str, side: int) -> np.ndarray:
    """Boolean ``side×side`` mask of a shape filling its box (tested at pixel centres)."""
    c = np.arange(side) + 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        r = side / 2
        return (x - r) ** 2 + (y - r) ** 2 <= r * r
    if shape == "triangle":  # apex at top centre, base along the bottom edge
        half_width = (y / side) * (side / 2)
        return np.abs(x - side / 2) <= half_width
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene) -> Image.Image:
    """RGB ``IMAGE_SIZE×IMAGE_SIZE`` image of ``scene``."""
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        if x1 - x0 != y1 - y0:
            raise ValueError(f"box {obj.box} is not square")
        canvas[y0:y1, x0:x1][_mask(obj.shape, x1 - x0)] = COLORS[obj.color]
    return Image.fromarray(canvas, "RGB")


def caption_of(objects: Sequence[ShapeObject | tuple[str, str]], relation: str | None = None) -> str:
    """Caption naming ``objects`` in order (``ShapeObject`` or ``(colour, shape)`` pairs)."""
    names = [f"a {o.color} {o.shape}" if isinstance(o, ShapeObject) else f"a {o[0]} {o[1]}" for o in objects]
    if not names:
        raise ValueError("a caption needs at least one object")
    if relation is not None:
        if relation not in _RELATION_WORDS or len(names) != 2:
            raise ValueError(f"relation must be one of {RELATIONS} between exactly two objects")
        return f"{names[0]} {_RELATION_WORDS[relation]} {names[1]}"
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def _satisfies(a: tuple[int, ...], b: tuple[int, ...], relation: str) -> bool:
    """Whether box ``a`` is ``relation`` box ``b`` (centres), clearly along that axis."""
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    d, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return d >= _MIN_OFFSET and d > abs(other)


def random_scene(rng: np.random.Generator, n_objects: int | None = None, relation: str | None | bool = False) -> Scene:
    """A random scene of ``n_objects`` (1-3; drawn when ``None``) with distinct (shape, colour) pairs.

    ``relation``: ``False`` draws one for half of the two-object scenes, ``None`` never, a name forces it.
    """
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, not {n_objects}")
    if relation is False:
        relation = RELATIONS[int(rng.integers(4))] if n_objects == 2 and rng.random() < 0.5 else None
    elif relation is not None and (relation not in RELATIONS or n_objects != 2):
        raise ValueError(f"relation must be one of {RELATIONS} between exactly two objects")
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    picked = [pairs[i] for i in rng.choice(len(pairs), n_objects, replace=False)]
    while True:
        sizes = [list(SIZES)[int(rng.integers(len(SIZES)))] for _ in picked]
        boxes: list[tuple[int, int, int, int]] = []
        for size in sizes:
            side = SIZES[size]
            for _ in range(50):
                x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, 2))
                box = (x, y, x + side, y + side)
                if all(_apart(box, other) for other in boxes) and (
                    relation is None or not boxes or _satisfies(boxes[0], box, relation)
                ):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == n_objects:
            break
    objects = tuple(ShapeObject(s, c, z, b) for (s, c), z, b in zip(picked, sizes, boxes))
    return Scene(objects, caption_of(objects, relation), relation)


def samples(seed: int, n: int, n_objects: int | None = None) -> Iterator[tuple[Image.Image, Scene]]:
    """``n`` (image, scene) pairs, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        scene = random_scene(rng, n_objects)
        yield render(scene), scene


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """The ``(colour, shape)`` pairs a caption names, in order (a size word may sit between)."""
    words = re.findall(r"[a-z]+", caption.lower())
    found = []
    for i, word in enumerate(words):
        if word in SHAPES:
            j = i - 1
            if j >= 0 and words[j] in SIZES:
                j -= 1
            if j >= 0 and words[j] in COLORS:
                found.append((words[j], word))
    return found
