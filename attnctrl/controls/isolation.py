"""`IsolationReposition`: multi-subject consistency with reference images in the same batch.

IR-Diffusion — He et al., "Improving Multi-Subject Consistency in Open-Domain Image Generation with
Isolation and Reposition Attention" (arXiv 2411.19261, 2024; official code in DreamStory). The batch
holds one *reference* image per subject (it shows that subject alone) and *target* images showing
several subjects; in the target's self-attention:

* **Isolation attention** (§3.2): a query in subject i's region gets −∞ logits toward the keys of
  every other subject j ≠ i of the same image, ``A = softmax(QKᵀ/√d + M_iso)``, so subjects never
  blend into each other. Done with an additive mask (`bias` hook); SDPA is kept.
* **Reposition attention** (§3.3): the keys/values of reference i are concatenated to the target's,
  ``softmax(Q[K; K_ref]ᵀ/√d + M)·[V; V_ref]``, and only the queries of the target's subject-i region
  may read reference i's subject tokens (−∞ everywhere else). Before that, reference i's subject
  region is cropped to its bounding box, resized (nearest) and moved into the target subject's box,
  so the shared tokens sit where the subject is drawn. Resizing hidden states with nearest
  neighbours and then projecting equals projecting and gathering the keys, which is what we do:
  each relocated key is the reference key it was copied from. On FLUX the rotary embedding of a
  moved key is re-applied at its new position, ``k' = R(p_dst)·R(p_src)⁻¹·k``.

Reference rows attend exactly as without the control (their extra keys are −∞).

Regions (see `attnctrl.regions` for the coordinate rules): `boxes` / `masks` for the subjects in the
targets, `reference_boxes` / `reference_masks` for subject i in reference image i. A region that is not
given is derived from the cross-attention maps of the subject's word — an internal reader averages
the conditional branch's image→text maps over the cross-attention layers during steps
``[0, mask_step)``, min-max normalises each subject's map, thresholds it at `threshold` and gives a
pixel to the strongest subject (IR-Diffusion uses GroundedSAM masks or sa@ca maps; we use no detector
weights). Until those regions exist (steps < `mask_step`) the parts that need them do nothing.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..control import Control
from ..regions import (
    bbox,
    box_cells,
    boxes_overlap,
    check_masks,
    mask_cells,
    normalise_boxes,
    parse_boxes,
    pixel_size,
)
from ..selectors import SelectorLike, as_selectors

NEG = float("-inf")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX rotary embedding (interleaved pairs, as `diffusers.models.embeddings.apply_rotary_emb`)."""
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-im, re], dim=-1).flatten(-2)
    return (x.float() * cos + turned * sin).to(x.dtype)


def move_rope(k: torch.Tensor, rope, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Keys k (B, H, N, D) rotated for sequence positions `src` (B, N), re-rotated for positions `dst`."""
    cos, sin = rope
    cs, ss = cos[src][:, None], sin[src][:, None]
    cd, sd = cos[dst][:, None], sin[dst][:, None]
    return rotate(rotate(k, cs, -ss), cd, sd)


class IsolationReposition(Control):
    """Isolation + reposition attention (IR-Diffusion, 2024) across the images of one batch.

    Args:
        subjects: the subjects' words or phrases (``["cat", "dog"]``), one per subject, as written in
            the prompts (used to find regions that are not given).
        references: image index (0-based, in the batch's image order) of each subject's reference
            image, one per subject; every other image is a target. None: no sharing, isolation only.
        boxes: the subjects' boxes in the targets, ``"x0,y0,x1,y1;x0,y0,x1,y1"`` or a list of boxes,
            normalised (all numbers in [0, 1]) or in pixels of the output image. None: from the maps.
        masks: tensor (subjects, H, W) of the subjects' regions in the targets instead of boxes
            (H × W = the image's pixel size or the token grid).
        reference_boxes: box of subject i in reference image i, same forms. None: from the maps.
        reference_masks: tensor (subjects, H, W): mask of subject i in reference image i.
        isolation: forbid attention between the subjects of a target image.
        reposition: move each reference subject into the target's box before sharing it (False:
            share the reference subject's tokens where they are).
        threshold: threshold on the min-max normalised maps for regions derived from attention.
        mask_step: regions from attention use the maps of steps [0, mask_step) and apply from then on.
        layers: self-attention layers to act on (default: all).
        steps: (start, stop) step range, ints or fractions (default: all steps).
    """

    name = "isolation"
    default_layers = "self"
    observes_only = True  # `probs` only reads the subject maps

    def __init__(
        self,
        subjects: list[str],
        references: list[int] | None = None,
        boxes: str | None = None,
        masks: torch.Tensor | None = None,
        reference_boxes: str | None = None,
        reference_masks: torch.Tensor | None = None,
        isolation: bool = True,
        reposition: bool = True,
        threshold: float = 0.5,
        mask_step: int = 4,
        layers: SelectorLike | None = None,
        steps=None,
    ):
        subjects = [subjects] if isinstance(subjects, str) else list(subjects)
        if not subjects or not all(isinstance(s, str) and s.strip() for s in subjects):
            raise ValueError(f"subjects must be a non-empty list of words or phrases, got {subjects!r}")
        n = len(subjects)
        if references is not None:
            references = [references] if isinstance(references, int) else list(references)
            if len(references) != n:
                raise ValueError(f"references: one reference image per subject ({n}), got {references!r}")
            if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in references):
                raise ValueError(f"references must be image indices >= 0, got {references!r}")
            if len(set(references)) != n:
                raise ValueError(f"references must be distinct images, got {references!r}")
        if not isolation and references is None:
            raise ValueError("nothing to do: isolation=False and no references to share")
        for a, b, what in ((boxes, masks, "boxes and masks"), (reference_boxes, reference_masks, "reference_boxes and reference_masks")):
            if a is not None and b is not None:
                raise ValueError(f"give either {what.replace(' and ', ' or ')}, not both")
        if references is None and (reference_boxes is not None or reference_masks is not None):
            raise ValueError("reference_boxes/reference_masks need references=")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not (isinstance(mask_step, int) and not isinstance(mask_step, bool) and mask_step >= 0):
            raise ValueError(f"mask_step must be an integer >= 0, got {mask_step!r}")
        self.subjects, self.references = subjects, references
        self.boxes = None if boxes is None else parse_boxes(boxes, "boxes")
        self.reference_boxes = None if reference_boxes is None else parse_boxes(reference_boxes, "reference_boxes")
        for got, what in ((self.boxes, "boxes"), (self.reference_boxes, "reference_boxes")):
            if got is not None and len(got) != n:
                raise ValueError(f"{what}: one box per subject ({n}), got {len(got)}")
        self.masks, self.reference_masks = masks, reference_masks
        self.isolation, self.reposition = bool(isolation), bool(reposition)
        self.threshold, self.mask_step = float(threshold), mask_step
        self._auto_targets = boxes is None and masks is None
        self._auto_refs = references is not None and reference_boxes is None and reference_masks is None
        self._reads = self._auto_targets or self._auto_refs
        user = self.default_layers if layers is None else layers
        self._apply = as_selectors(user)
        sel = [s.text for s in self._apply] + (["cross"] if self._reads else [])
        super().__init__(layers=sel, steps=steps)

    # ---- where ---------------------------------------------------------------------------------
    def _matches(self, layer, grid=None) -> bool:
        sels = self._apply if grid is not None else [replace(s, res=frozenset()) for s in self._apply]
        return layer.has_part("self") and any(s.matches(layer, grid) for s in sels)

    def narrow_layers(self, picked: list, grid) -> list:
        # keep the self-attention layers of the user's selector, and the cross-attention read for maps
        return [(lay, h) for lay, h in picked if self._matches(lay, grid) or (self._reads and lay.has_part("cross"))]

    def check_layers(self, picked) -> None:
        if not any(self._matches(layer) for layer, _ in picked):
            raise ValueError(f"{type(self).__name__} acts on self-attention; layers={[s.text for s in self._apply]} picks none")

    def _applies(self, call) -> bool:
        st = call.run.store[self]
        got = st["applies"].get(call.layer.name)
        if got is None:
            got = st["applies"][call.layer.name] = self._matches(call.layer, call.run.grid)
        return got

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        n_img, n = run.layout.images, len(self.subjects)
        refs = self.references or []
        bad = [r for r in refs if r >= n_img]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: reference image(s) {bad} outside the batch of {n_img} image(s) (indices 0..{n_img - 1})"
            )
        size = pixel_size(run)
        sizes = [s for s in (size, tuple(run.grid)) if s is not None]
        boxes = None if self.boxes is None else normalise_boxes(self.boxes, size, "boxes")
        ref_boxes = None if self.reference_boxes is None else normalise_boxes(self.reference_boxes, size, "reference_boxes")
        masks = None if self.masks is None else check_masks(self.masks, n, sizes, "masks")
        ref_masks = None if self.reference_masks is None else check_masks(self.reference_masks, n, sizes, "reference_masks")
        if self.isolation and boxes is not None:
            for i in range(n):
                for j in range(i + 1, n):
                    if boxes_overlap(boxes[i], boxes[j]):
                        raise ValueError(
                            f"boxes of {self.subjects[i]!r} and {self.subjects[j]!r} overlap; isolated subjects need "
                            "disjoint regions (or isolation=False)"
                        )
        if self.isolation and masks is not None and n > 1:
            both = ((masks > 0.5).sum(0) > 1).nonzero()
            if len(both):
                raise ValueError(f"masks overlap (e.g. at pixel {tuple(both[0].tolist())}); isolated subjects need disjoint masks")
        st = {
            "targets": [i for i in range(n_img) if i not in refs], "boxes": boxes, "ref_boxes": ref_boxes,
            "masks": masks, "ref_masks": ref_masks, "maps": {}, "auto": None, "cache": {}, "applies": {}, "tokens": None,
        }
        if self._reads:
            st["tokens"] = self._resolve_tokens(run, st["targets"])
        run.store[self] = st

    def _resolve_tokens(self, run, targets) -> dict:
        """{image: [token indices or None per subject]} for the words whose maps give regions."""
        from ..tokens import joint_text_indices

        pipe = run.store.get("pipeline")
        if pipe is None or not run.prompts:
            raise ValueError(f"{type(self).__name__}: regions from attention maps need ControlledPipeline and prompts; give boxes or masks")
        msl = run.text_len if run.family == "flux" else (run.text_len - 77 if run.family == "sd3" and run.text_len else None)
        per = max(run.layout.images // len(run.prompts), 1)
        out = {}
        for img in range(run.layout.images):
            prompt = run.prompts[min(img // per, len(run.prompts) - 1)]
            if img in targets:
                want = range(len(self.subjects)) if self._auto_targets else []
            else:
                want = [self.references.index(img)] if self._auto_refs else []
            row = [None] * len(self.subjects)
            for i in want:
                row[i] = joint_text_indices(pipe.pipe, prompt, self.subjects[i], run.family, max_sequence_length=msl)
            out[img] = row
        return out

    def end(self, run) -> None:
        run.store.pop(self, None)

    # ---- the map reader (regions from attention) -----------------------------------------------
    def needs_probs(self, call) -> bool:
        if not self._reads or call.k_text is None or call.run.state is None or call.run.state.index >= self.mask_step:
            return False
        return call.run.layout.has("cond") and not torch.is_grad_enabled()

    def probs(self, call, p: torch.Tensor) -> torch.Tensor:
        st = call.run.store[self]
        rows = call.run.layout.rows("cond")
        block = p[rows, :, call.q_image, call.k_text].float().mean(dim=1)  # (images, L, T)
        if call.q_text is not None:  # joint attention: a distribution over the text tokens
            block = block / block.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(block.dtype).tiny)
        sel = st.get("select")
        if sel is None or sel.shape[1] != block.shape[-1]:
            sel = torch.zeros(block.shape[0], block.shape[-1], len(self.subjects))
            for img, row in st["tokens"].items():
                for i, idx in enumerate(row):
                    if idx is not None:
                        if max(idx) >= block.shape[-1]:
                            raise ValueError(f"{self.subjects[i]!r} lies beyond the {block.shape[-1]} text tokens of this model")
                        sel[img, idx, i] = 1.0
            sel = st["select"] = sel.to(block.device)
        m = torch.bmm(block, sel)  # (images, L, subjects)
        entry = st["maps"].get(call.grid)
        if entry is None:
            st["maps"][call.grid] = [m, 1]
        else:
            entry[0] = entry[0] + m
            entry[1] += 1
        return p

    def _auto(self, run, st) -> torch.Tensor | None:
        """(images, subjects, H, W) 0/1 regions from the maps read so far (computed once), or None."""
        if st["auto"] is None:
            if run.state is None or run.state.index < self.mask_step or not st["maps"]:
                return None
            h, w = run.grid
            ups = []
            for (gh, gw), (total, count) in st["maps"].items():
                m = (total / count).cpu().permute(0, 2, 1).reshape(total.shape[0], -1, gh, gw)
                ups.append(torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False))
            m = torch.stack(ups).mean(0)
            lo, hi = m.amin(dim=(-2, -1), keepdim=True), m.amax(dim=(-2, -1), keepdim=True)
            m = (m - lo) / (hi - lo).clamp_min(1e-12)
            out = torch.zeros_like(m)
            for img, row in st["tokens"].items():
                want = [i for i, idx in enumerate(row) if idx is not None]
                if not want:
                    continue
                cells = m[img, want] >= self.threshold
                if len(want) > 1:
                    cells &= m[img, want] >= m[img, want].amax(dim=0, keepdim=True)
                out[img, want] = cells.float()
            st["auto"] = out
        return st["auto"]

    # ---- regions at a layer --------------------------------------------------------------------
    def _target_cells(self, st, grid, img, auto) -> torch.Tensor | None:
        """Bool (subjects, h, w) of the subjects' regions in target image `img`, or None (unknown yet)."""
        if st["boxes"] is not None:
            return torch.stack([box_cells(b, grid) for b in st["boxes"]])
        if st["masks"] is not None:
            return mask_cells(st["masks"], grid, exclusive=True)
        if auto is None:
            return None
        return mask_cells(auto[img], grid, exclusive=True)

    def _ref_cells(self, st, grid, i, auto) -> torch.Tensor | None:
        """Bool (h, w): subject i's region in its reference image, or None."""
        if st["ref_boxes"] is not None:
            return box_cells(st["ref_boxes"][i], grid)
        if st["ref_masks"] is not None:
            return mask_cells(st["ref_masks"][i : i + 1], grid, exclusive=False)[0]
        if auto is None:
            return None
        return mask_cells(auto[self.references[i], i : i + 1], grid, exclusive=False)[0]

    def _pairs(self, target: torch.Tensor, ref: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, dst) flat token indices of the reference subject's tokens, relocated into `target`'s box."""
        tb, rb = bbox(target), bbox(ref)
        if tb is None or rb is None:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        if not self.reposition:
            flat = torch.nonzero(ref.flatten()).flatten()
            return flat, flat
        t0, t1, l0, l1 = tb
        r0, r1, c0, c1 = rb
        th, tw, rh, rw = t1 - t0 + 1, l1 - l0 + 1, r1 - r0 + 1, c1 - c0 + 1
        ys = torch.arange(th)
        xs = torch.arange(tw)
        sy = r0 + torch.div(ys * rh, th, rounding_mode="floor")  # nearest, as F.interpolate(mode="nearest")
        sx = c0 + torch.div(xs * rw, tw, rounding_mode="floor")
        keep = ref[sy][:, sx]  # the relocated reference mask inside the target box
        dst = ((t0 + ys)[:, None] * w + (l0 + xs)[None, :])[keep]
        src = (sy[:, None] * w + sx[None, :])[keep]
        return src, dst

    def _plan(self, call, st):
        """Per-layer-shape plan: extra key gather indices and the additive bias (cached), or None."""
        run, layout = call.run, call.run.layout
        auto = self._auto(run, st) if self._reads else None
        key = (call.grid, call.q.shape[2], call.k.shape[2], call.q_image.start, call.k_image.start,
               layout.branches, layout.images, auto is not None, call.q.dtype, call.q.device)
        plan = st["cache"].get(key)
        if plan is not None:
            return plan
        h, w = call.grid
        subjects = len(self.subjects)
        targets = st["targets"]
        per_target = {}
        for t in targets:
            cells = self._target_cells(st, call.grid, t, auto)
            if cells is None:
                continue
            pairs = []
            if self.references is not None:
                for i in range(subjects):
                    ref = self._ref_cells(st, call.grid, i, auto)
                    if ref is None:
                        continue
                    src, dst = self._pairs(cells[i], ref, w)
                    pairs.append((i, src, dst))
            per_target[t] = (cells, pairs)
        if not per_target:
            st["cache"][key] = False
            return False
        n_extra = max((sum(len(s) for _, s, _ in pairs) for _, pairs in per_target.values()), default=0)
        B, Lq, Lk = layout.size, call.q.shape[2], call.k.shape[2]
        qi, ki = call.q_image, call.k_image
        bias = torch.zeros(B, 1, Lq, Lk + n_extra)
        if n_extra:
            bias[:, :, :, Lk:] = NEG
        rows = torch.arange(B)[:, None].expand(B, max(n_extra, 1))[:, :n_extra].clone()
        src_tok = torch.zeros(B, n_extra, dtype=torch.long)
        dst_tok = torch.zeros(B, n_extra, dtype=torch.long)
        moved = False
        for branch in layout.branches:
            start = layout.rows(branch).start
            for t, (cells, pairs) in per_target.items():
                b = start + t
                label = torch.zeros(h * w, dtype=torch.long)
                for i in range(subjects):
                    label[cells[i].flatten()] = i + 1
                if self.isolation and subjects > 1:
                    forbid = (label[:, None] > 0) & (label[None, :] > 0) & (label[:, None] != label[None, :])
                    sub = bias[b, 0, qi, ki]
                    sub[forbid] = NEG
                    bias[b, 0, qi, ki] = sub
                at = 0
                for i, src, dst in pairs:
                    n = len(src)
                    if not n:
                        continue
                    rows[b, at : at + n] = start + self.references[i]
                    src_tok[b, at : at + n] = src
                    dst_tok[b, at : at + n] = dst
                    moved = moved or not torch.equal(src, dst)
                    allow = torch.full((h * w,), NEG)
                    allow[cells[i].flatten()] = 0.0
                    bias[b, 0, qi.start + torch.arange(h * w), Lk + at : Lk + at + n] = allow[:, None].expand(h * w, n)
                    at += n
        dev, dt = call.q.device, call.q.dtype
        plan = {
            "extra": n_extra, "rows": rows.to(dev), "src": src_tok.to(dev), "dst": dst_tok.to(dev), "moved": moved,
            "bias": bias.to(device=dev, dtype=dt),
        }
        st["cache"][key] = plan
        return plan

    # ---- attention -----------------------------------------------------------------------------
    def qkv(self, call) -> None:
        if not self._applies(call):
            return
        plan = self._plan(call, call.run.store[self])
        if not plan:
            return
        call.extras[self] = plan
        n = plan["extra"]
        if not n:
            return
        ki = call.k_image
        k_img, v_img = call.k[:, :, ki], call.v[:, :, ki]
        k_sh = k_img[plan["rows"], :, plan["src"]].permute(0, 2, 1, 3)  # (B, H, n, D)
        v_sh = v_img[plan["rows"], :, plan["src"]].permute(0, 2, 1, 3)
        rope = call.extras.get("rope")
        if plan["moved"] and rope is not None:
            k_sh = move_rope(k_sh, rope, plan["src"] + ki.start, plan["dst"] + ki.start)
        call.k = torch.cat([call.k, k_sh.to(call.k.dtype)], dim=2)
        call.v = torch.cat([call.v, v_sh.to(call.v.dtype)], dim=2)
        if call.mask is not None:  # the model's own mask does not know the extra keys: they stay open
            pad = call.mask.new_zeros(call.mask.shape[:-1] + (n,))
            call.mask = torch.cat([call.mask.expand(*call.mask.shape[:-1], call.mask.shape[-1]), pad], dim=-1)

    def bias(self, call) -> torch.Tensor | None:
        plan = call.extras.get(self)
        return None if not plan else plan["bias"]

    def __repr__(self) -> str:
        return (
            f"IsolationReposition(subjects={self.subjects!r}, references={self.references!r}, isolation={self.isolation}, "
            f"reposition={self.reposition}, layers={[s.text for s in self._apply]!r}, steps={self.steps!r})"
        )


__all__: Sequence[str] = ["IsolationReposition"]
