"""Find the coloured shapes in a Shapes-world image, and score an image against its caption.

No learned weights: colour segmentation and box geometry, tolerant enough for a generator's output.

1. **Colour.** The image is white-balanced (its background, the median border colour, is scaled
   to white). Every pixel is then projected onto the segment from the background (white) to each palette
   colour: ``p ≈ white + α·(colour − white)``. It belongs to the colour with the smallest distance
   to its line if ``α ≥ min_alpha`` (at least half-way from white: blurred edges stay with their
   shape instead of becoming a paler palette colour) and the distance is ≤ ``max_dist``;
   otherwise it is background.
2. **Clean-up.** Isolated pixels (≤ 1 same-colour neighbour in 3×3) are dropped; a pixel with
   ≥ 5 of 8 neighbours of one colour takes that colour (fills speckle holes, never erodes).
3. **Components** of equal colour (4-connected). A small component close to a larger one of the
   same colour is merged into it (a shape split by a speckle line); a small component mostly inside
   a larger one of another colour is dropped (an off-colour patch); components under ``min_area``
   pixels are noise.
4. **Shape** from the mask inside its box: *taper* (mean width of the top third over the bottom
   third: ≈ 0.2 for an upright triangle, 1 for circles and squares) separates triangles; *corner
   fill* (share of the four corner patches covered: ≈ 1 for a square, ≈ 0.1 for a circle)
   separates squares from circles; the fill ratio of the box (1, π/4, ½) breaks near ties.

`score` compares what was found with what a caption (or a `Scene`, or ``(colour, shape)`` pairs)
names: presence, attribute binding, count and, for captions with one, the spatial relation.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .data import (
    BACKGROUND,
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    parse_caption,
)

__all__ = ["DetectedObject", "aggregate", "classify_shape", "detect", "label_pixels", "named_objects", "score"]


@dataclass(frozen=True)
class DetectedObject:
    """One detected shape: ``box`` is ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive; ``area`` in pixels."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    area: int

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def size(self) -> str:
        """The `SIZES` name whose side is closest to the box's longer side."""
        x0, y0, x1, y1 = self.box
        side = max(x1 - x0, y1 - y0)
        return min(SIZES, key=lambda k: abs(SIZES[k] - side))


# ------------------------------------------------------------------------------- pixel labels


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """H×W×3 float array in 0..255 (floats in [0, 1] are scaled; grey and RGBA are converted)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # C×H×W
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an H×W×3 image, got an array of shape {np.shape(image)}")
    arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, -1)
    arr = arr.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and arr.size and arr.max() <= 1.0:
        arr = arr * 255.0
    return arr


def label_pixels(
    image: Image.Image | np.ndarray, *, max_dist: float = 70.0, min_alpha: float = 0.5
) -> tuple[np.ndarray, list[str]]:
    """Per-pixel colour index (H×W int; ``-1`` background) and the colour names it indexes."""
    rgb = _as_rgb(image)
    names = list(COLORS)
    bg = np.asarray(BACKGROUND, np.float32)
    rgb = rgb * (bg / np.maximum(_background(rgb), 1.0))  # white balance: a colour cast moves the palette too
    d = np.asarray([COLORS[n] for n in names], np.float32) - bg  # K×3 directions from the background
    rel = rgb - bg  # H×W×3
    alpha = np.einsum("hwc,kc->khw", rel, d) / (d * d).sum(1)[:, None, None]
    resid = np.linalg.norm(rel[None] - alpha[..., None] * d[:, None, None], axis=-1)
    resid = np.where(alpha >= min_alpha, resid, np.inf)
    best = resid.argmin(0)
    ok = np.take_along_axis(resid, best[None], 0)[0] <= max_dist
    labels = np.where(ok, best, -1)
    return _clean(labels, len(names)), names


def _background(rgb: np.ndarray) -> np.ndarray:
    """The image's background colour: the median of its border pixels (shapes cover little of the
    border), or `BACKGROUND` when that median is far from it (a degenerate image)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    est = np.median(border, axis=0)
    ref = np.asarray(BACKGROUND, np.float32)
    return est if np.linalg.norm(est - ref) <= 100 else ref


def _neighbour_counts(labels: np.ndarray, k: int) -> np.ndarray:
    """K×H×W: pixels of each colour in every 3×3 window (centre included)."""
    onehot = (labels[None] == np.arange(k)[:, None, None]).astype(np.int16)
    pad = np.pad(onehot, ((0, 0), (1, 1), (1, 1)))
    h, w = labels.shape
    counts = np.zeros((k, h, w), np.int16)
    for dy in range(3):
        for dx in range(3):
            counts += pad[:, dy : dy + h, dx : dx + w]
    return counts


def _clean(labels: np.ndarray, k: int) -> np.ndarray:
    counts = _neighbour_counts(labels, k)
    own = np.take_along_axis(counts, np.clip(labels, 0, None)[None], 0)[0]
    out = np.where((labels >= 0) & (own <= 2), -1, labels)  # isolated speckles
    best = counts.argmax(0)
    fill = (np.take_along_axis(counts, best[None], 0)[0] >= 5) & (labels != best)
    return np.where(fill, best, out)


# ---------------------------------------------------------------------------------- components


def _components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal label: H×W int, the flat index of a representative pixel
    (-1 for background). Min-label propagation with pointer jumping; no scipy needed."""
    h, w = labels.shape
    fg = labels >= 0
    big = h * w
    comp = np.where(fg, np.arange(big).reshape(h, w), big)
    same_r = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    same_d = fg[:-1, :] & (labels[:-1, :] == labels[1:, :])
    while True:
        prev = comp
        comp = comp.copy()
        m = np.minimum(comp[:, :-1], comp[:, 1:])
        comp[:, :-1] = np.where(same_r, m, comp[:, :-1])
        comp[:, 1:] = np.where(same_r, np.minimum(comp[:, 1:], m), comp[:, 1:])
        m = np.minimum(comp[:-1, :], comp[1:, :])
        comp[:-1, :] = np.where(same_d, m, comp[:-1, :])
        comp[1:, :] = np.where(same_d, np.minimum(comp[1:, :], m), comp[1:, :])
        flat = comp.reshape(-1)
        for _ in range(4):  # pointer jumping: a pixel's label is a pixel of the same component
            flat = np.where(flat < big, np.append(flat, big)[np.minimum(flat, big)], big)
        comp = flat.reshape(h, w)
        if np.array_equal(comp, prev):
            return np.where(fg, comp, -1)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _trim(mask: np.ndarray, most: int = 2) -> tuple[int, int, int, int]:
    """Box of a cropped mask without up to `most` edge rows/columns that hold a single pixel next
    to a wide one (a speckle glued to the shape, not a triangle's apex); offsets
    ``(left, top, right, bottom)`` into the crop."""
    h, w = mask.shape
    rows, cols = mask.sum(1), mask.sum(0)

    def cut(counts: np.ndarray, n: int) -> int:
        k = 0
        while k < most and n - k > 4 and counts[k] <= 1 and counts[k + 1] >= 4:
            k += 1
        return k

    t, b = cut(rows, h), cut(rows[::-1], h)
    left, r = cut(cols, w), cut(cols[::-1], w)
    return left, t, w - r, h - b


def _near(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[0] - gap < b[2] and b[0] - gap < a[2] and a[1] - gap < b[3] and b[1] - gap < a[3]


def _fragment_of(part: list, host: list, gap: int, max_area: int) -> bool:
    """Whether component `part` is a piece of the larger `host`: small, near it, and the union of
    their boxes still about square (every Shapes object has a square box)."""
    if part[2] > max_area or part[2] >= 0.5 * host[2] or not _near(part[3], host[3], gap):
        return False
    a, b = part[3], host[3]
    w, h = max(a[2], b[2]) - min(a[0], b[0]), max(a[3], b[3]) - min(a[1], b[1])
    return min(w, h) / max(w, h) >= 0.7


def _inside(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Share of box ``a``'s area that lies inside box ``b``."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h / max(1, (a[2] - a[0]) * (a[3] - a[1]))


# --------------------------------------------------------------------------------------- shape


def classify_shape(mask: np.ndarray) -> str:
    """``"triangle"``, ``"square"`` or ``"circle"`` for a boolean mask cropped to its box."""
    h, w = mask.shape
    widths = mask.sum(1).astype(np.float64)
    third = max(1, h // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1e-9)
    fill = mask.mean()
    if min(taper, 1 / max(taper, 1e-9)) < 0.55 and fill < 0.8:
        return "triangle"
    ch, cw = max(1, round(0.2 * h)), max(1, round(0.2 * w))
    corners = np.mean([mask[:ch, :cw].mean(), mask[:ch, -cw:].mean(), mask[-ch:, :cw].mean(), mask[-ch:, -cw:].mean()])
    square = 0.5 * (corners - 0.1) / 0.9 + 0.5 * (fill - np.pi / 4) / (1 - np.pi / 4)
    return "square" if square > 0.5 else "circle"


def detect(
    image: Image.Image | np.ndarray,
    *,
    min_area: int | None = None,
    max_dist: float = 70.0,
    min_alpha: float = 0.5,
) -> list[DetectedObject]:
    """The shapes in ``image`` (PIL or H×W×3 array, uint8 or floats in [0, 1]), largest first.

    ``min_area``: smallest object in pixels (default 0.6 % of the image, 24 px at 64×64; the
    smallest Shapes object, a 16 px triangle, has ~120). ``max_dist`` / ``min_alpha``: colour
    tolerance, see the module doc.
    """
    labels, names = label_pixels(image, max_dist=max_dist, min_alpha=min_alpha)
    h, w = labels.shape
    if min_area is None:
        min_area = max(8, round(0.006 * h * w))
    comp = _components(labels)
    ids, areas = np.unique(comp[comp >= 0], return_counts=True)
    parts = []  # [id, colour index, area, box]
    for cid, area in sorted(zip(ids.tolist(), areas.tolist()), key=lambda t: -t[1]):
        mask = comp == cid
        parts.append([cid, int(labels.flat[cid]), int(area), _box(mask)])
    gap = max(2, round(0.04 * max(h, w)))
    # merge small same-colour fragments into a larger neighbour (largest first, so chains collapse)
    kept: list[list] = []
    for part in parts:
        host = next((k for k in kept if k[1] == part[1] and _fragment_of(part, k, gap, 3 * min_area)), None)
        if host is None:
            kept.append(part)
            continue
        comp[comp == part[0]] = host[0]
        host[2] += part[2]
        b, c = host[3], part[3]
        host[3] = (min(b[0], c[0]), min(b[1], c[1]), max(b[2], c[2]), max(b[3], c[3]))
    out = []
    for cid, color, area, box in kept:
        if area < min_area:
            continue
        if any(k[2] > 3 * area and k[1] != color and _inside(box, k[3]) > 0.7 for k in kept):
            continue  # an off-colour patch on a bigger shape
        x0, y0, x1, y1 = box
        mask = comp[y0:y1, x0:x1] == cid
        a, b, c, d = _trim(mask)
        shape = classify_shape(mask[b:d, a:c])
        out.append(DetectedObject(shape, names[color], (x0 + a, y0 + b, x0 + c, y0 + d), area))
    return out


# ------------------------------------------------------------------------------------- scoring

_RELATION_PHRASES = {
    "to the left of": "left of",
    "to the right of": "right of",
    "left of": "left of",
    "right of": "right of",
    "above": "above",
    "below": "below",
}
_RELATION_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _RELATION_PHRASES), key=len, reverse=True)) + r")\b")


def named_objects(target: Any) -> tuple[list[tuple[str, str]], str | None]:
    """``([(colour, shape), ...], relation)`` named by a caption, a `Scene`, or a sequence of
    `ShapeObject` / `DetectedObject` / ``(colour, shape)`` pairs. A caption's relation is read
    from its words (``"to the left of"`` → ``"left of"``), and applies to its first two objects."""
    if isinstance(target, str):
        m = _RELATION_RE.search(target.lower())
        return parse_caption(target), (_RELATION_PHRASES[m.group(1)] if m else None)
    if isinstance(target, Scene):
        return [(o.color, o.shape) for o in target.objects], target.relation
    if isinstance(target, Sequence):
        pairs = []
        for o in target:
            if isinstance(o, (ShapeObject, DetectedObject)):
                pairs.append((o.color, o.shape))
            elif isinstance(o, Sequence) and len(o) == 2 and o[0] in COLORS and o[1] in SHAPES:
                pairs.append((o[0], o[1]))
            else:
                raise ValueError(f"cannot read a (colour, shape) object from {o!r}")
        return pairs, None
    raise TypeError(f"expected a caption, a Scene or a list of objects, got {type(target).__name__}")


def _relation_holds(a: DetectedObject, b: DetectedObject, relation: str) -> bool:
    """Box centres: ``a`` is ``relation`` ``b`` along that axis, more than along the other one."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    d, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return d > 0 and d >= abs(other)


def score(target: Any, detected: Sequence[DetectedObject]) -> dict:
    """Compare what ``target`` (caption, `Scene` or objects) names with ``detected``.

    Returns a dict:

    - ``presence`` (bool): every named (colour, shape) is found (with multiplicity);
      ``presence_rate``: share of named objects found.
    - ``binding`` (bool): every named object whose *shape* is found has its named colour, and at
      least one named shape is found (an image with none binds nothing); ``binding_rate``: share of
      named objects with their shape found that carry the right colour (None when none is found).
    - ``count`` (bool): as many objects detected as named.
    - ``relation`` (bool | None): for a target with a relation, both objects are found and their
      box centres satisfy it; None when the target has none.
    - ``n_named``, ``n_detected``.
    """
    named, relation = named_objects(target)
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}")
    want, have = Counter(named), Counter((d.color, d.shape) for d in detected)
    found = sum((want & have).values())
    shapes_named = Counter(s for _, s in named)
    shapes_seen = Counter(d.shape for d in detected)
    bound = comparable = 0
    for s, n in shapes_named.items():
        comparable += min(n, shapes_seen[s])
        bound += sum(
            (Counter(c for c, s2 in named if s2 == s) & Counter(d.color for d in detected if d.shape == s)).values()
        )
    rel = None
    if relation is not None and len(named) >= 2:
        a = [d for d in detected if (d.color, d.shape) == named[0]]
        b = [d for d in detected if (d.color, d.shape) == named[1]]
        rel = bool(a and b and _relation_holds(a[0], b[0], relation))
    n = len(named)
    return {
        "presence": found == n,
        "presence_rate": found / n if n else 1.0,
        "binding": comparable > 0 and bound == comparable,
        "binding_rate": bound / comparable if comparable else None,
        "count": len(detected) == n,
        "relation": rel,
        "n_named": n,
        "n_detected": len(detected),
    }


def aggregate(scores: Sequence[dict]) -> dict:
    """Means over images: ``presence`` (share of images with every object, and ``presence_rate``
    the share of objects), ``binding``, ``count``, ``relation`` (over images whose target has one;
    None if none does) and ``n``."""

    def mean(key: str) -> float | None:
        vals = [float(s[key]) for s in scores if s.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {k: mean(k) for k in ("presence", "presence_rate", "binding", "count", "relation")} | {"n": len(scores)}
