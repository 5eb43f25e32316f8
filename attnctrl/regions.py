"""Image regions for region-aware controls: boxes and masks given by the user, rasterised per layer.

Coordinates. A box is ``(x0, y0, x1, y1)`` with ``x`` to the right and ``y`` down, the top-left
corner of the image at ``(0, 0)``. When every number of every box is in ``[0, 1]`` the boxes are
*normalised* (fractions of the width and height); otherwise they are *pixels* of the output image
(``height × width`` of the call). On the command line several boxes are separated by ``;``:
``boxes="0,0,32,64;32,0,64,64"``.

A mask is a tensor ``(subjects, H, W)`` (or ``(H, W)`` for one region), non-zero inside the region,
with ``H × W`` either the output image's pixel size or the denoiser's input token grid (latent
size for SD/SDXL, packed-token grid for SD3/FLUX). Any other size is an error: resizing silently
would hide an aspect-ratio mistake.

Rasterising at a layer's token grid ``(h, w)``: a box covers the cells whose centre lies inside it
(so boxes that only touch never share a cell); a mask covers the cells at least half inside it
(area average). Disjoint masks stay disjoint at every grid (a cell goes to the region covering
most of it).

Moving a region (IR-Diffusion's reposition): `relocate` crops a region to its bounding box and resizes
it into another region's bounding box with nearest neighbours — exactly `F.interpolate(mode="nearest")`,
as the reference code resizes hidden states — and gives the (source, destination) cells.

Regions from attention maps: `regions_from_maps` averages per-resolution maps, min-max normalises each
subject's map and keeps the cells strictly above a threshold, each cell going to the strongest subject.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]
BoxesLike = str | Sequence[Sequence[float]]

__all__ = [
    "bbox",
    "box_cells",
    "boxes_overlap",
    "check_masks",
    "mask_cells",
    "normalise_boxes",
    "parse_boxes",
    "regions_from_maps",
    "relocate",
]


def parse_boxes(boxes: BoxesLike, what: str = "boxes") -> list[Box]:
    """Boxes from ``"x0,y0,x1,y1;x0,y0,x1,y1"`` or a sequence of 4-number sequences (not yet normalised)."""
    if isinstance(boxes, str):
        parts = [p.strip() for p in boxes.split(";") if p.strip()]
        items = []
        for p in parts:
            try:
                items.append([float(x) for x in p.split(",")])
            except ValueError:
                raise ValueError(
                    f"{what}: cannot read box {p!r}; write x0,y0,x1,y1 and separate boxes with ';'"
                ) from None
    else:
        items = [list(b) for b in boxes]
    out = []
    for b in items:
        if len(b) != 4 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in b):
            raise ValueError(f"{what}: a box is 4 numbers x0,y0,x1,y1, got {b!r}")
        x0, y0, x1, y1 = (float(x) for x in b)
        if x0 < 0 or y0 < 0 or not (x1 > x0 and y1 > y0):
            raise ValueError(f"{what}: box {b!r} must have 0 <= x0 < x1 and 0 <= y0 < y1")
        out.append((x0, y0, x1, y1))
    if not out:
        raise ValueError(f"{what}: no box given")
    return out


def normalise_boxes(boxes: list[Box], size: tuple[int, int] | None, what: str = "boxes") -> list[Box]:
    """Boxes as fractions of the image: unchanged if all numbers are <= 1, else divided by the pixel size (H, W)."""
    if all(v <= 1.0 for b in boxes for v in b):
        return list(boxes)
    if size is None:
        raise ValueError(
            f"{what} are in pixels but the image size is unknown here; give normalised boxes (numbers in [0, 1])"
        )
    h, w = size
    for b in boxes:
        if b[2] > w or b[3] > h:
            raise ValueError(f"{what}: box {b} lies outside the {w}x{h} (width x height) image")
    return [(b[0] / w, b[1] / h, b[2] / w, b[3] / h) for b in boxes]


def boxes_overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share an area (touching edges do not count)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def box_cells(box: Box, grid: tuple[int, int], device=None) -> torch.Tensor:
    """Bool (h, w): the cells of `grid` whose centre lies in the normalised `box`."""
    h, w = grid
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w
    iny = (ys >= box[1]) & (ys < box[3])
    inx = (xs >= box[0]) & (xs < box[2])
    return iny[:, None] & inx[None, :]


def check_masks(masks, count: int, sizes: list[tuple[int, int]], what: str = "masks") -> torch.Tensor:
    """Validate user masks: a float tensor (count, H, W) with (H, W) in `sizes`; returns it in [0, 1] (CPU, float32)."""
    if not torch.is_tensor(masks):
        try:
            masks = torch.as_tensor(masks)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} must be a tensor (subjects, H, W), got {type(masks).__name__}") from None
    m = masks.detach().to("cpu", torch.float32)
    if m.dim() == 2 and count == 1:
        m = m[None]
    if m.dim() != 3 or m.shape[0] != count:
        raise ValueError(f"{what} must have shape ({count}, H, W) (one mask per subject), got {tuple(masks.shape)}")
    if tuple(m.shape[-2:]) not in [tuple(s) for s in sizes]:
        ok = " or ".join(f"{s[0]}x{s[1]}" for s in dict.fromkeys(tuple(s) for s in sizes))
        raise ValueError(
            f"{what} have size {m.shape[-2]}x{m.shape[-1]} (H x W); expected {ok} "
            "(the image's pixel size or the denoiser's token grid)"
        )
    if not torch.isfinite(m).all():
        raise ValueError(f"{what} contain NaN or inf")
    return (m > 0).float() if m.max() > 1 or m.min() < 0 else m


def mask_cells(masks: torch.Tensor, grid: tuple[int, int], exclusive: bool = True) -> torch.Tensor:
    """Bool (n, h, w) from float masks (n, H, W): cells at least half covered (area average).

    With `exclusive`, a cell covered by several masks goes to the one covering most of it.
    """
    m = masks.float()
    if tuple(m.shape[-2:]) != tuple(grid):
        m = (
            F.interpolate(m[None], size=grid, mode="area")[0]
            if all(a % b == 0 for a, b in zip(m.shape[-2:], grid))
            else F.interpolate(m[None], size=grid, mode="bilinear", align_corners=False, antialias=True)[0]
        )
    cells = m >= 0.5
    if exclusive and m.shape[0] > 1:
        best = m.argmax(dim=0, keepdim=True)
        cells &= torch.arange(m.shape[0], device=m.device).view(-1, 1, 1) == best
    return cells


def bbox(cells: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), inclusive, of a bool (h, w) region; None if empty."""
    ys, xs = torch.nonzero(cells, as_tuple=True)
    if ys.numel() == 0:
        return None
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def relocate(ref: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move region `ref` into `target`'s bounding box: ``(src, dst)`` flat cell indices of an (h, w) grid.

    `ref` is cropped to its bounding box and resized onto `target`'s bounding box with nearest
    neighbours, the index map being the one ``F.interpolate(crop, size, mode="nearest")`` uses
    (source index ``floor(dst · in/out)`` in float32, which is *not* always the exact integer floor: e.g.
    26 → 22 cells differ). Returns the destination cells where the moved region is on and the source cell
    each one copies, in row-major order of the destination; both empty if either region is empty.
    """
    if ref.shape != target.shape:
        raise ValueError(f"relocate: regions of different grids {tuple(ref.shape)} and {tuple(target.shape)}")
    empty = torch.zeros(0, dtype=torch.long)
    tb, rb = bbox(target), bbox(ref)
    if tb is None or rb is None:
        return empty, empty
    h, w = ref.shape
    t0, t1, l0, l1 = tb
    r0, r1, c0, c1 = rb
    # the flat index of every cell as a float64 image (exact below 2**53), resized like the hidden states
    flat = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)[:, :, r0 : r1 + 1, c0 : c1 + 1]
    src = F.interpolate(flat, size=(t1 - t0 + 1, l1 - l0 + 1), mode="nearest")[0, 0].long()
    dst = torch.arange(t0, t1 + 1)[:, None] * w + torch.arange(l0, l1 + 1)[None, :]
    keep = ref.flatten().to(ref.device)[src.to(ref.device)].cpu()
    return src[keep], dst[keep]


def regions_from_maps(
    maps: Sequence[torch.Tensor], grid: tuple[int, int], threshold: float, wanted: torch.Tensor
) -> torch.Tensor:
    """0/1 regions (images, subjects, H, W) from attention maps of the subjects' words.

    `maps`: one (images, subjects, h, w) map per resolution; each is resized to `grid` (bilinear,
    ``align_corners=False``) and they are averaged. Each image's map of each subject is min-max normalised
    to [0, 1]; a cell is in the subject's region when its value is strictly above `threshold` (as
    IR-Diffusion binarises: ``m > t``) and, among the `wanted` subjects of that image, no other subject's
    normalised value is higher (ties keep both). `wanted`: bool (images, subjects), the maps that count;
    the other regions are empty.
    """
    ups = [F.interpolate(m.float(), size=tuple(grid), mode="bilinear", align_corners=False) for m in maps]
    m = torch.stack(ups).mean(0)
    lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    want = wanted.to(torch.bool)[:, :, None, None]
    cells = (m > threshold) & want
    best = torch.where(want, m, torch.full_like(m, -1.0)).amax(dim=1, keepdim=True)
    cells &= m >= best
    return cells.float()
