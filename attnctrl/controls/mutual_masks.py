"""MasaCtrl's masks for `MutualSelfAttention` (Cao et al., ICCV 2023, §3.3): fixed masks and MaskAuto from cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..regions import mask_cells

#: MaskAuto reads the cross-attention at 1/4 of the input token grid (MasaCtrl: 16×16 at 512 px)
MASK_FACTOR = 4
_NAME = "MutualSelfAttention"


def auto_masks(
    maps: torch.Tensor, map_grid: tuple[int, int], grid: tuple[int, int], threshold: float = 0.1
) -> torch.Tensor:
    """MasaCtrl's automatic masks: bool (images, h·w) at `grid` from mean token maps (images, H·W) at `map_grid`.

    Each image's map is min-max normalised over its cells, resized to `grid` (nearest, as
    ``F.interpolate``'s default in the reference) and thresholded: foreground where ``≥ threshold``.
    A constant map normalises to 0 (all background).
    """
    m = maps.float()
    lo, hi = m.amin(dim=-1, keepdim=True), m.amax(dim=-1, keepdim=True)
    m = (m - lo) / (hi - lo).clamp_min(torch.finfo(m.dtype).tiny)
    m = m.reshape(m.shape[0], 1, *map_grid)
    if tuple(map_grid) != tuple(grid):
        m = F.interpolate(m, size=tuple(grid), mode="nearest")
    return (m >= threshold).flatten(1)


def token_list(value, what: str) -> list | None:
    if value is None:
        return None
    items = [value] if isinstance(value, (str, int)) else list(value) if isinstance(value, (list, tuple)) else None
    ok = items and all(
        (isinstance(t, str) and t.strip()) or (isinstance(t, int) and not isinstance(t, bool)) for t in items
    )
    if not ok:
        raise ValueError(
            f"{what} must be a word or phrase of the prompt (or a list of them, or token indices), got {value!r}"
        )
    return items


def resolve_tokens(ctrl, run) -> list[list[int]]:
    """Token indices per image: the source's mask_tokens in its prompt, the target tokens in each target's."""
    run.needs_text(f"{_NAME}(mask_tokens=)")
    out = []
    for img in range(run.layout.images):
        words = ctrl.mask_tokens if img == ctrl.source else (ctrl.target_mask_tokens or ctrl.mask_tokens)
        idx: list[int] = []
        for w in words or ():
            idx += [i for i in run.tokens(img, w) if i not in idx]
        out.append(idx)
    return out


def add_maps(ctrl, call, block: torch.Tensor) -> None:
    """Add this layer's head-averaged maps of the chosen tokens to the step's sum; `block` is the
    conditional rows' image→text probabilities, (images, L, T), averaged over heads."""
    st = call.run.store[ctrl]
    index = step_index(call.run)
    sel = st.get("select")
    if sel is None or sel.shape[-1] != block.shape[-1]:
        sel = torch.zeros(block.shape[0], block.shape[-1], 1)
        for img, idx in enumerate(st["tokens"]):
            if max(idx) >= block.shape[-1]:
                raise ValueError(
                    f"{_NAME}: mask token {max(idx)} lies beyond the {block.shape[-1]} text tokens of this model"
                )
            sel[img, idx, 0] = 1.0
        sel = st["select"] = sel.to(block.device)
    m = torch.bmm(block, sel)[..., 0]  # (images, L): summed over each image's tokens
    acc = st["maps"]
    if acc is None or acc["step"] != index:
        st["maps"] = {"step": index, "sum": m, "count": 1, "grid": tuple(call.grid)}
    else:
        acc["sum"] = acc["sum"] + m
        acc["count"] += 1


def auto_cells(ctrl, call, st):
    """(source key mask (L,), target blend masks (images, L)) at this layer from this step's maps, or None."""
    acc = st["maps"]
    index = step_index(call.run)
    if acc is None or acc["step"] != index:
        return None  # no map of this step yet: plain mutual attention, as the reference
    key = (index, acc["count"], tuple(call.grid))
    got = st["auto"]
    if got is None or got[0] != key:
        masks = auto_masks(acc["sum"] / acc["count"], acc["grid"], call.grid, ctrl.mask_threshold)
        got = st["auto"] = (key, (masks[ctrl.source].to(call.q.device), masks.float().to(call.q.device)))
    return got[1]


def given_cells(call, st):
    """(source key mask (L,), target blend masks (1, L)) from the user's masks at this layer's grid."""
    key = call.grid
    got = st["cells"].get(key)
    if got is None:
        ms, mt = st["masks"]
        s = mask_cells(ms, call.grid, exclusive=False)[0].flatten()
        t = mask_cells(mt, call.grid, exclusive=False)[0].flatten().float()
        got = st["cells"][key] = (s.to(call.q.device), t[None].to(call.q.device))
    return got


def masked(call, o, rows, cells):
    """MasaCtrl's mask-guided attention on the target rows (their keys are already the source's):
    ``M_t·A(Q_t, K_s^fg, V_s^fg) + (1 − M_t)·A(Q_t, K_s^bg, V_s^bg)``, fg/bg from the source's mask."""
    src, tgt = cells
    t = rows["t"]
    m = (tgt[rows["img"]] if tgt.shape[0] > 1 else tgt).to(o.dtype)
    q, k, v = call.q[t], call.k[t], call.v[t]
    ki, qi = call.k_image, call.q_image
    fg = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
    bg = torch.zeros_like(fg)
    fg[ki] = torch.where(src, 0.0, float("-inf")).to(q.dtype)
    bg[ki] = torch.where(src, float("-inf"), 0.0).to(q.dtype)
    o_fg = F.scaled_dot_product_attention(q, k, v, attn_mask=fg.view(1, 1, 1, -1), scale=call.scale)
    o_bg = F.scaled_dot_product_attention(q, k, v, attn_mask=bg.view(1, 1, 1, -1), scale=call.scale)
    m = m.view(m.shape[0], 1, -1, 1)
    blended = m * o_fg[:, :, qi] + (1 - m) * o_bg[:, :, qi]
    # a source mask with no fore- or no background: plain mutual attention (no host sync to decide)
    both = src.any() & ~src.all()
    o = o.clone()
    o[t, :, qi] = torch.where(both, blended, o[t][:, :, qi])
    return o


def step_index(run) -> int:
    """The run's step index (0 before the first step)."""
    return run.state.index if run.state is not None else 0
