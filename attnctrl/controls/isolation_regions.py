"""Regions, map reader and reposition index maps of `IsolationReposition` (IR-Diffusion, arXiv 2411.19261)."""

from __future__ import annotations

import torch

from ..regions import (
    box_cells,
    boxes_overlap,
    check_masks,
    mask_cells,
    normalise_boxes,
    regions_from_maps,
    relocate,
)
from .isolation_layers import shares_layer

NEG = float("-inf")


def check_regions(ctrl, run, n: int) -> tuple:
    """(boxes, reference boxes, masks, reference masks) of `ctrl` for `run`, normalised and checked."""
    size = run.pixel_size
    sizes = [s for s in (size, tuple(run.grid)) if s is not None]
    boxes = None if ctrl.boxes is None else normalise_boxes(ctrl.boxes, size, "boxes")
    ref_boxes = None if ctrl.reference_boxes is None else normalise_boxes(ctrl.reference_boxes, size, "reference_boxes")
    masks = None if ctrl.masks is None else check_masks(ctrl.masks, n, sizes, "masks")
    ref_masks = None if ctrl.reference_masks is None else check_masks(ctrl.reference_masks, n, sizes, "reference_masks")
    if ctrl.isolation and boxes is not None:
        for i in range(n):
            for j in range(i + 1, n):
                if boxes_overlap(boxes[i], boxes[j]):
                    raise ValueError(
                        f"boxes of {ctrl.subjects[i]!r} and {ctrl.subjects[j]!r} overlap; isolated subjects need "
                        "disjoint regions (or isolation=False)"
                    )
    if ctrl.isolation and masks is not None and n > 1:
        both = ((masks > 0.5).sum(0) > 1).nonzero()
        if len(both):
            raise ValueError(
                f"masks overlap (e.g. at pixel {tuple(both[0].tolist())}); isolated subjects need disjoint masks"
            )
    return boxes, ref_boxes, masks, ref_masks


def resolve_tokens(ctrl, run, targets) -> dict:
    """{image: [token indices or None per subject]} for the words whose maps give regions."""
    run.needs_text(f"{type(ctrl).__name__} (regions from attention maps; or give boxes or masks)")
    out = {}
    for img in range(run.layout.images):
        if img in targets:
            want = range(len(ctrl.subjects)) if ctrl._auto_targets else []
        else:
            want = [ctrl.references.index(img)] if ctrl._auto_refs and ctrl.references is not None else []
        row = [None] * len(ctrl.subjects)
        for i in want:
            row[i] = run.tokens(img, ctrl.subjects[i])
        out[img] = row
    return out


def add_maps(ctrl, call, block: torch.Tensor) -> None:
    """The map reader: add this layer's conditional image→text maps of the subjects' words to the
    sums; `block` is the conditional rows' image→text probabilities, (images, L, T), head-averaged."""
    st = call.run.store[ctrl]
    if call.q_text is not None:  # joint attention: a distribution over the text tokens
        block = block / block.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)
    sel = st.get("select")
    if sel is None or sel.shape[1] != block.shape[-1]:
        sel = torch.zeros(block.shape[0], block.shape[-1], len(ctrl.subjects))
        for img, row in st["tokens"].items():
            for i, idx in enumerate(row):
                if idx is not None:
                    if max(idx) >= block.shape[-1]:
                        raise ValueError(
                            f"{ctrl.subjects[i]!r} lies beyond the {block.shape[-1]} text tokens of this model"
                        )
                    sel[img, idx, i] = 1.0
        sel = st["select"] = sel.to(block.device)
    m = torch.bmm(block, sel)  # (images, L, subjects)
    entry = st["maps"].get(call.grid)
    if entry is None:
        st["maps"][call.grid] = [m, 1]
    else:
        entry[0] = entry[0] + m
        entry[1] += 1


def auto_regions(ctrl, run) -> torch.Tensor | None:
    """The regions derived from attention, (images, subjects, H, W) 0/1 at the run's token grid, once
    steps [0, mask_step) have been read (computed once per run); None before, or when all are given."""
    st = run.store[ctrl]
    if st["auto"] is None:
        if not ctrl._reads or run.state is None or run.state.index < ctrl.mask_step or not st["maps"]:
            return None
        maps = [
            (total / count).cpu().permute(0, 2, 1).reshape(total.shape[0], -1, gh, gw)
            for (gh, gw), (total, count) in st["maps"].items()
        ]
        wanted = torch.zeros(run.layout.images, len(ctrl.subjects), dtype=torch.bool)
        for img, row in st["tokens"].items():
            for i, idx in enumerate(row):
                wanted[img, i] = idx is not None
        st["auto"] = regions_from_maps(maps, run.grid, ctrl.threshold, wanted)
    return st["auto"]


def target_cells(st, grid, img, auto) -> torch.Tensor | None:
    """Bool (subjects, h, w) of the subjects' regions in target image `img`, or None (unknown yet)."""
    if st["boxes"] is not None:
        return torch.stack([box_cells(b, grid) for b in st["boxes"]])
    if st["masks"] is not None:
        return mask_cells(st["masks"], grid, exclusive=True)
    if auto is None:
        return None
    return mask_cells(auto[img], grid, exclusive=True)


def ref_cells(ctrl, st, grid, i, auto) -> torch.Tensor | None:
    """Bool (h, w): subject i's region in its reference image, or None."""
    if st["ref_boxes"] is not None:
        return box_cells(st["ref_boxes"][i], grid)
    if st["ref_masks"] is not None:
        return mask_cells(st["ref_masks"][i : i + 1], grid, exclusive=False)[0]
    if auto is None or ctrl.references is None:
        return None
    return mask_cells(auto[ctrl.references[i], i : i + 1], grid, exclusive=False)[0]


def moved_pairs(reposition: bool, target: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) flat token indices of the reference subject's tokens, relocated into `target`'s box."""
    if not reposition:
        if not bool(target.any()):
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        flat = torch.nonzero(ref.flatten()).flatten()
        return flat, flat
    return relocate(ref, target)


def row_plan(ctrl, call, st):
    """Per-layer-shape plan of the target rows (cached): gather indices of the shared keys, the
    regions and the isolation mask; False when nothing applies (yet)."""
    run, layout = call.run, call.run.layout
    auto = ctrl.regions(run) if ctrl._reads else None
    shares = shares_layer(ctrl, run, call.layer)
    key = (
        call.grid,
        call.q.shape[2],
        call.k.shape[2],
        call.q_image.start,
        call.k_image.start,
        layout.branches,
        layout.images,
        auto is not None,
        shares,
        call.q.dtype,
        call.q.device,
    )
    plan = st["cache"].get(key)
    if plan is not None:
        return plan
    h, w = call.grid
    subjects = len(ctrl.subjects)
    per_target = {}
    for t in st["targets"]:
        cells = target_cells(st, call.grid, t, auto)
        if cells is None:
            continue
        pairs = []
        if shares:
            for i in range(subjects):
                ref = ref_cells(ctrl, st, call.grid, i, auto)
                if ref is not None:
                    src, dst = moved_pairs(ctrl.reposition, cells[i], ref)
                    if len(src):
                        pairs.append((i, src, dst))
        per_target[t] = (cells.reshape(subjects, h * w), pairs)
    isolate = ctrl.isolation and subjects > 1
    if not per_target or not (isolate or any(pairs for _, pairs in per_target.values())):
        st["cache"][key] = False
        return False
    rows = [(layout.rows(b).start, t) for b in layout.branches for t in per_target]
    T, B = len(rows), layout.size
    n_extra = max(sum(len(s) for _, s, _ in per_target[t][1]) for _, t in rows)
    Lq, Lk = call.q.shape[2], call.k.shape[2]
    qi, ki = call.q_image, call.k_image
    q_rows = torch.arange(qi.start, qi.start + h * w)
    own = torch.zeros(T, 1, Lq, Lk) if isolate else None
    region = torch.zeros(T, subjects, Lq, dtype=torch.bool)
    key_subject = torch.full((T, n_extra), subjects, dtype=torch.long)  # `subjects`: padding, never read
    src_rows = torch.tensor([start + t for start, t in rows])[:, None].repeat(1, n_extra)
    src_tok = torch.zeros(T, n_extra, dtype=torch.long)
    dst_tok = torch.zeros(T, n_extra, dtype=torch.long)
    moved = False
    for j, (start, t) in enumerate(rows):
        cells, pairs = per_target[t]
        region[j][:, q_rows] = cells
        if isolate:
            label = torch.zeros(h * w, dtype=torch.long)
            for i in range(subjects):
                label[cells[i]] = i + 1
            forbid = (label[:, None] > 0) & (label[None, :] > 0) & (label[:, None] != label[None, :])
            own[j, 0, qi.start : qi.start + h * w, ki.start : ki.start + h * w] = torch.where(forbid, NEG, 0.0)
        at = 0
        for i, src, dst in pairs:
            n = len(src)
            key_subject[j, at : at + n] = i
            src_rows[j, at : at + n] = start + ctrl.references[i]
            src_tok[j, at : at + n] = src
            dst_tok[j, at : at + n] = dst
            moved = moved or not torch.equal(src, dst)
            at += n
    targets = torch.tensor([start + t for start, t in rows])
    others = torch.tensor([b for b in range(B) if b not in set(targets.tolist())], dtype=torch.long)
    dev, dt = call.q.device, call.q.dtype
    plan = {
        "targets": targets.to(dev),
        "others": others.to(dev),
        "extra": n_extra,
        "Lk": Lk,
        "moved": moved,
        "src_rows": src_rows.to(dev),
        "src": src_tok.to(dev),
        "dst": dst_tok.to(dev),
        "own": None if own is None else own.to(device=dev, dtype=dt),
        "region": region.to(dev),
        "key_subject": key_subject.to(dev),
        "step": None,
    }
    st["cache"][key] = plan
    return plan
