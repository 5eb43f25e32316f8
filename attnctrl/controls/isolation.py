"""`IsolationReposition`: multi-subject consistency with reference images in the same batch.

IR-Diffusion — He et al., "Improving Multi-Subject Consistency in Open-Domain Image Generation with
Isolation and Reposition Attention" (arXiv 2411.19261, 2024; official code: hehuiguo/DreamStory,
``DreamStoryScaledAttnProcessor`` run by ``run_IR_Diffusion.sh``). The batch holds one *reference* image
per subject (it shows that subject alone) and *target* images showing several subjects:

* **Isolation attention** (§3.2), every selected self-attention layer: a target query in subject i's
  region gets −∞ logits toward the keys of every other subject j ≠ i of the same image,
  ``A = softmax(QKᵀ/√d + M_iso)``, so subjects never blend into each other.
* **Reposition attention** (§3.3), the decoder layers (see `start_layer`): the keys/values of
  reference i are concatenated to the target's, ``softmax(Q[K; K_ref]ᵀ/√d + M)·[V; V_ref]``, and only
  the queries of the target's subject-i region may read reference i's subject tokens (−∞ everywhere
  else). Before that, reference i's subject region is cropped to its bounding box, resized (nearest,
  as ``F.interpolate``) and moved into the target subject's box, so the shared tokens sit where the
  subject is drawn. Resizing hidden states with nearest neighbours and then projecting equals
  projecting and gathering the keys, which is what we do: each relocated key is the reference key it
  was copied from. On FLUX the rotary embedding of a moved key is re-applied at its new position,
  ``k' = R(p_dst)·R(p_src)⁻¹·k``.
* **Region dropout** (reference code ``_dropout_mask``, ``dropout=0.5``): at every step each subject's
  target region is thinned by a Bernoulli(1 − p) draw per cell (one draw per step and token grid,
  shared by the branches and by all layers of that grid); dropped target queries do not read the
  reference that step (they still attend to their own image). Isolation and the mutual
  cross-attention use the full regions, as the reference code does. If a draw drops a whole region
  the full region is used. The draws come from ``torch.Generator`` seeded with (`seed`, step, grid),
  so a run is reproducible and independent of the denoiser's own random numbers.
* **Mutual cross-attention** (reference code ``cross_attention``, λ = 0.9), every cross-attention
  layer of a UNet: target queries in subject i's region also attend to reference i's text keys and
  values, ``O_i = softmax(Q_t K_iᵀ/√d) V_i``, and the target's output becomes
  ``(1 − λ)·O_t + λ·Σ_i m_i O_i / Σ_i m_i`` where ``Σ_i m_i > 0``, ``O_t`` elsewhere. The reference code
  mixes after the output projection; the weights sum to 1, so mixing the per-head outputs before the
  (affine) projection is the same.

Reference rows attend exactly as without the control. When no other control adds a mask, edits
outputs or reads probabilities on a layer, the control computes that layer's attention itself, row
group by row group: reference rows with their own keys and no mask (the stock SDPA call on those rows,
bit-identical to vanilla on every CPU kernel), target rows with the shared keys and the mask. With
such another control on the layer, all rows go through one SDPA with the shared keys −∞ for reference
rows (equal to vanilla up to float rounding), so the other control sees and shapes the same attention.

Regions (see `attnctrl.regions` for the coordinate rules): `boxes` / `masks` for the subjects in the
targets, `reference_boxes` / `reference_masks` for subject i in reference image i. A region that is not
given is derived from the cross-attention maps of the subject's word — an internal reader averages
the conditional branch's image→text maps over the cross-attention layers during steps
``[0, mask_step)``, min-max normalises each subject's map, keeps the cells strictly above `threshold`
and gives a cell to the strongest subject (IR-Diffusion uses GroundedSAM masks or sa@ca maps; we use
no detector weights). Until those regions exist (steps < `mask_step`) the parts that need them do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..attention import active_chain, sdpa_scale
from ..control import Control
from ..layers import forward_order, list_layers
from ..regions import (
    box_cells,
    boxes_overlap,
    check_masks,
    mask_cells,
    normalise_boxes,
    parse_boxes,
    regions_from_maps,
    relocate,
)
from ..rope import rerotate
from ..selectors import SelectorLike, as_selectors

NEG = float("-inf")
#: IR-Diffusion's sharing start on SDXL: self-attention layer 36 of 70 in forward order (reference code
#: ``pipe_test.py``: ``start_layer=36`` on playground-v2.5), i.e. the up blocks without the first two
#: transformer blocks of ``up_blocks.0``
SDXL_START_LAYER = 36
#: hooks of another control on the same layer that make this one share the layer's single SDPA call
_SHARING_HOOKS = ("bias", "out", "replaced_rows", "probs")


def move_rope(k: torch.Tensor, rope, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Keys k (B, H, N, D) rotated for sequence positions `src` (B, N), re-rotated for positions `dst`."""
    cos, sin = rope
    return rerotate(k, (cos[src][:, None], sin[src][:, None]), (cos[dst][:, None], sin[dst][:, None]))


def default_start_layer(order: list) -> int:
    """First sharing layer (index into the self-attention layers in forward order) when `start_layer` is None.

    SDXL (70 self-attention layers): 36, the reference code's value. Other UNets (SD 1.x/2.x, small
    SDXL-like models): the first layer of the up blocks (the decoder; the reference code has no SD
    setting). SD3 / FLUX (no decoder): the second half of the layers in forward order.
    """
    places = [lay.place for lay in order]
    if not {"down", "mid", "up"} & set(places):
        return len(order) // 2
    first_down = min((lay.factor for lay in order if lay.place == "down"), default=1)
    if first_down >= 2 and len(order) > SDXL_START_LAYER:  # SDXL: its first down block has no attention
        return SDXL_START_LAYER
    return next((i for i, p in enumerate(places) if p == "up"), len(order))


def dropout_keep(seed: int, step: int, grid: tuple[int, int], subjects: int, p: float) -> torch.Tensor:
    """Bool (subjects, h·w): the cells each subject's region keeps at `step` on `grid` (each with probability 1 − p).

    Drawn from a CPU ``torch.Generator`` seeded with a fixed function of (seed, step, grid), so the same
    arguments always give the same cells, whatever else the run draws."""
    h, w = grid
    mixed = ((int(seed) * 1_000_003 + int(step)) * 1_000_033 + h * 65_537 + w) % (2**63 - 1)
    g = torch.Generator().manual_seed(mixed)
    return torch.bernoulli(torch.full((subjects, h * w), 1.0 - p), generator=g).bool()


def _rows_of(mask: torch.Tensor | None, rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The model's own mask for batch `rows` (it may broadcast over the batch)."""
    if mask is None:
        return None
    return mask[rows] if mask.dim() == 4 and mask.shape[0] == batch else mask


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
        start_layer: first self-attention layer that shares reference tokens, counted from 0 in forward
            order over the self-attention layers `layers` selects (down → mid → up; double → single
            blocks). None: the decoder — 36 on SDXL (the reference code), the up blocks on SD 1.x/2.x,
            the second half on SD3 / FLUX. 0: every selected layer. Isolation acts on every selected layer.
        mutual_cross: λ of the mutual cross-attention (reference code 0.9; 0 turns it off). UNets
            only: SD3 / FLUX have no separate cross-attention layer and are left as they are.
        dropout: probability of dropping a target-region cell from reading its reference, redrawn at
            every step (reference code 0.5; 0 turns it off).
        seed: seed of the dropout draws.
        threshold: regions derived from attention keep the normalised map's cells above it.
        mask_step: regions from attention use the maps of steps [0, mask_step) and apply from then on.
        layers: layers to act on: its self-attention layers get isolation (and sharing from
            `start_layer`), its cross-attention layers the mutual cross-attention (default: all).
        steps: (start, stop) step range, ints or fractions (default: all steps).
    """

    name = "isolation"
    # −∞ isolation bias; with references, the references' subject keys/values are appended
    effects = property(lambda self: frozenset({"bias"} | ({"extends_kv"} if self.references is not None else set())))
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
        start_layer: int | None = None,
        mutual_cross: float = 0.9,
        dropout: float = 0.5,
        seed: int = 0,
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
        for a, b, what in (
            (boxes, masks, "boxes and masks"),
            (reference_boxes, reference_masks, "reference_boxes and reference_masks"),
        ):
            if a is not None and b is not None:
                raise ValueError(f"give either {what.replace(' and ', ' or ')}, not both")
        if references is None and (reference_boxes is not None or reference_masks is not None):
            raise ValueError("reference_boxes/reference_masks need references=")
        if not (isinstance(threshold, (int, float)) and 0.0 < threshold < 1.0):
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        for name, v in (("mask_step", mask_step), ("seed", seed)) + (
            (("start_layer", start_layer),) if start_layer is not None else ()
        ):
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if not (
            isinstance(mutual_cross, (int, float)) and not isinstance(mutual_cross, bool) and 0.0 <= mutual_cross <= 1.0
        ):
            raise ValueError(f"mutual_cross (λ) must be in [0, 1], got {mutual_cross!r}")
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.subjects, self.references = subjects, references
        self.boxes = None if boxes is None else parse_boxes(boxes, "boxes")
        self.reference_boxes = None if reference_boxes is None else parse_boxes(reference_boxes, "reference_boxes")
        for got, what in ((self.boxes, "boxes"), (self.reference_boxes, "reference_boxes")):
            if got is not None and len(got) != n:
                raise ValueError(f"{what}: one box per subject ({n}), got {len(got)}")
        self.masks, self.reference_masks = masks, reference_masks
        self.isolation, self.reposition = bool(isolation), bool(reposition)
        self.start_layer, self.mutual_cross = start_layer, float(mutual_cross)
        self.dropout, self.seed = float(dropout), seed
        self.threshold, self.mask_step = float(threshold), mask_step
        self._auto_targets = boxes is None and masks is None
        self._auto_refs = references is not None and reference_boxes is None and reference_masks is None
        self._reads = self._auto_targets or self._auto_refs
        self._mutual = references is not None and self.mutual_cross > 0.0
        self._apply = as_selectors(self.default_layers if layers is None else layers)
        self._cross = as_selectors("cross" if layers is None else layers)
        sel = [s.text for s in self._apply] + (["cross"] if self._reads or self._mutual else [])
        super().__init__(layers=sel, steps=steps)

    # ---- where ---------------------------------------------------------------------------------
    @staticmethod
    def _grid_free(sels):
        return [replace(s, res=frozenset()) for s in sels]

    def _matches(self, layer, grid=None) -> bool:
        """A self-attention layer of the user's selector (isolation, sharing)."""
        sels = self._apply if grid is not None else self._grid_free(self._apply)
        return layer.has_part("self") and any(s.matches(layer, grid) for s in sels)

    def _mutual_matches(self, layer, grid=None) -> bool:
        """A UNet cross-attention layer of the user's selector (mutual cross-attention)."""
        sels = self._cross if grid is not None else self._grid_free(self._cross)
        return self._mutual and layer.kind == "cross" and any(s.matches(layer, grid) for s in sels)

    def narrow_layers(self, picked: list, grid) -> list:
        # the self-attention layers of the user's selector, the cross-attention layers of the mutual
        # cross-attention, and the cross-attention read for maps
        kept = [
            (lay, h)
            for lay, h in picked
            if self._matches(lay, grid) or self._mutual_matches(lay, grid) or (self._reads and lay.has_part("cross"))
        ]
        self._sharing([lay for lay, _ in picked])  # a start_layer beyond the layers fails here, before any step
        return kept

    def _sharing(self, layers: list) -> frozenset[str] | None:
        """Names of the self-attention layers among `layers` that share (from `start_layer` on, in forward
        order); None without references."""
        if self.references is None:
            return None
        order = forward_order([lay for lay in layers if self._matches(lay)])
        start = default_start_layer(order) if self.start_layer is None else self.start_layer
        if self.start_layer is not None and start >= len(order):
            raise ValueError(
                f"{type(self).__name__}: start_layer={start} but the selected layers have {len(order)} self-attention "
                "layers (counted from 0 in forward order); give a smaller start_layer"
            )
        return frozenset(lay.name for lay in order[start:])

    def check_layers(self, picked) -> None:
        if not any(self._matches(layer) for layer, _ in picked):
            raise ValueError(
                f"{type(self).__name__} acts on self-attention; layers={[s.text for s in self._apply]} picks none"
            )

    def _applies(self, call) -> str | None:
        """ "self" (isolation / sharing), "cross" (mutual cross-attention) or None for this layer (cached)."""
        st = call.run.store[self]
        name = call.layer.name
        if name not in st["applies"]:
            grid = call.run.grid
            st["applies"][name] = (
                "self"
                if self._matches(call.layer, grid)
                else "cross"
                if self._mutual_matches(call.layer, grid)
                else None
            )
        return st["applies"][name]

    def _shares(self, run, layer) -> bool:
        """Whether self-attention `layer` shares reference tokens: from `start_layer` on among the layers this
        control got in the run's plan (their `LayerInfo`s from the run's denoiser; once per plan)."""
        if self.references is None:
            return False
        st = run.store[self]
        got = st["share"]
        if got is None or got[0] is not run.plan:  # ac.attach plans again for a new grid
            mine = {name for name, entries in run.plan.items() if any(c is self for c, _ in entries)}
            got = st["share"] = (
                run.plan,
                self._sharing([lay for lay in list_layers(run.denoiser) if lay.name in mine]),
            )
        return layer.name in got[1]

    def _alone(self, call) -> bool:
        """No other active control on this layer adds a mask, edits outputs or reads probabilities."""
        return not any(
            c is not self and c.implements(h)
            for c, _ in active_chain(call.run, call.layer.name)
            for h in _SHARING_HOOKS
        )

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        n_img, n = run.layout.images, len(self.subjects)
        refs = self.references or []
        bad = [r for r in refs if r >= n_img]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: reference image(s) {bad} outside the batch of {n_img} image(s) (indices 0..{n_img - 1})"
            )
        size = run.pixel_size
        sizes = [s for s in (size, tuple(run.grid)) if s is not None]
        boxes = None if self.boxes is None else normalise_boxes(self.boxes, size, "boxes")
        ref_boxes = (
            None if self.reference_boxes is None else normalise_boxes(self.reference_boxes, size, "reference_boxes")
        )
        masks = None if self.masks is None else check_masks(self.masks, n, sizes, "masks")
        ref_masks = (
            None if self.reference_masks is None else check_masks(self.reference_masks, n, sizes, "reference_masks")
        )
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
                raise ValueError(
                    f"masks overlap (e.g. at pixel {tuple(both[0].tolist())}); isolated subjects need disjoint masks"
                )
        st: dict[str, Any] = {
            "targets": [i for i in range(n_img) if i not in refs],
            "boxes": boxes,
            "ref_boxes": ref_boxes,
            "masks": masks,
            "ref_masks": ref_masks,
            "maps": {},
            "auto": None,
            "cache": {},
            "mutual": {},
            "applies": {},
            "tokens": None,
            "keep": {},
            "share": None,
        }
        if self._reads:
            st["tokens"] = self._resolve_tokens(run, st["targets"])
        run.store[self] = st

    def _resolve_tokens(self, run, targets) -> dict:
        """{image: [token indices or None per subject]} for the words whose maps give regions."""
        run.needs_text(f"{type(self).__name__} (regions from attention maps; or give boxes or masks)")
        out = {}
        for img in range(run.layout.images):
            if img in targets:
                want = range(len(self.subjects)) if self._auto_targets else []
            else:
                want = [self.references.index(img)] if self._auto_refs and self.references is not None else []
            row = [None] * len(self.subjects)
            for i in want:
                row[i] = run.tokens(img, self.subjects[i])
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
                            raise ValueError(
                                f"{self.subjects[i]!r} lies beyond the {block.shape[-1]} text tokens of this model"
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
        return p

    def regions(self, run) -> torch.Tensor | None:
        """The regions derived from attention, (images, subjects, H, W) 0/1 at the run's token grid, once
        steps [0, mask_step) have been read (computed once per run); None before, or when all are given."""
        st = run.store[self]
        if st["auto"] is None:
            if not self._reads or run.state is None or run.state.index < self.mask_step or not st["maps"]:
                return None
            maps = [
                (total / count).cpu().permute(0, 2, 1).reshape(total.shape[0], -1, gh, gw)
                for (gh, gw), (total, count) in st["maps"].items()
            ]
            wanted = torch.zeros(run.layout.images, len(self.subjects), dtype=torch.bool)
            for img, row in st["tokens"].items():
                for i, idx in enumerate(row):
                    wanted[img, i] = idx is not None
            st["auto"] = regions_from_maps(maps, run.grid, self.threshold, wanted)
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
        if auto is None or self.references is None:
            return None
        return mask_cells(auto[self.references[i], i : i + 1], grid, exclusive=False)[0]

    def _pairs(self, target: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(src, dst) flat token indices of the reference subject's tokens, relocated into `target`'s box."""
        if not self.reposition:
            if not bool(target.any()):
                return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
            flat = torch.nonzero(ref.flatten()).flatten()
            return flat, flat
        return relocate(ref, target)

    def _plan(self, call, st):
        """Per-layer-shape plan of the target rows (cached): gather indices of the shared keys, the
        regions and the isolation mask; False when nothing applies (yet)."""
        run, layout = call.run, call.run.layout
        auto = self.regions(run) if self._reads else None
        shares = self._shares(run, call.layer)
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
        subjects = len(self.subjects)
        per_target = {}
        for t in st["targets"]:
            cells = self._target_cells(st, call.grid, t, auto)
            if cells is None:
                continue
            pairs = []
            if shares:
                for i in range(subjects):
                    ref = self._ref_cells(st, call.grid, i, auto)
                    if ref is not None:
                        src, dst = self._pairs(cells[i], ref)
                        if len(src):
                            pairs.append((i, src, dst))
            per_target[t] = (cells.reshape(subjects, h * w), pairs)
        isolate = self.isolation and subjects > 1
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
                src_rows[j, at : at + n] = start + self.references[i]
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

    def _keep(self, call, st) -> torch.Tensor:
        """Bool (subjects, Lq): the query cells this step's dropout keeps (per step and grid, cached)."""
        state = call.run.state
        step = state.index if state is not None else 0
        key = (step, call.grid, call.q.shape[2], call.q_image.start, call.q.device)
        got = st["keep"].get(key)
        if got is None:
            if any(k[0] != step for k in st["keep"]):
                st["keep"] = {}
            h, w = call.grid
            keep = torch.zeros(len(self.subjects), call.q.shape[2], dtype=torch.bool)
            keep[:, call.q_image.start : call.q_image.start + h * w] = dropout_keep(
                self.seed, step, call.grid, len(self.subjects), self.dropout
            )
            got = st["keep"][key] = keep.to(call.q.device)
        return got

    def _target_bias(self, call, st, plan) -> torch.Tensor:
        """(T, 1, Lq, Lk + extra) additive mask of the target rows at this step (built once per step)."""
        state = call.run.state
        step = (state.index if state is not None else 0) if self.dropout > 0 and plan["extra"] else -1
        if plan["step"] == step:
            return plan["bias"]
        T, subjects = plan["region"].shape[:2]
        Lq, Lk, n = call.q.shape[2], plan["Lk"], plan["extra"]
        own = plan["own"] if plan["own"] is not None else call.q.new_zeros(T, 1, Lq, Lk)
        if not n:
            bias = own
        else:
            allow = plan["region"]
            if self.dropout > 0:
                thinned = allow & self._keep(call, st)[None]
                allow = torch.where(thinned.any(-1, keepdim=True), thinned, allow)  # a region never vanishes
            allow = torch.cat([allow, allow.new_zeros(T, 1, Lq)], dim=1).transpose(1, 2)  # (T, Lq, subjects + 1)
            ok = allow.gather(2, plan["key_subject"][:, None, :].expand(T, Lq, n))
            extra = torch.zeros(T, 1, Lq, n, dtype=own.dtype, device=own.device).masked_fill_(~ok[:, None], NEG)
            bias = torch.cat([own, extra], dim=-1)
        plan["step"], plan["bias"] = step, bias
        return bias

    def _shared_kv(self, call, plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (T, H, extra, D) the target rows read from their references (RoPE moved on FLUX)."""
        ki = call.k_image
        k_sh = call.k[:, :, ki][plan["src_rows"], :, plan["src"]].permute(0, 2, 1, 3)
        v_sh = call.v[:, :, ki][plan["src_rows"], :, plan["src"]].permute(0, 2, 1, 3)
        rope = call.extras.get("rope")
        if plan["moved"] and rope is not None:
            k_sh = move_rope(k_sh, rope, plan["src"] + ki.start, plan["dst"] + ki.start)
        return k_sh.to(call.k.dtype), v_sh.to(call.v.dtype)

    # ---- attention -----------------------------------------------------------------------------
    def qkv(self, call) -> None:
        if self._applies(call) != "self":
            return
        st = call.run.store[self]
        plan = self._plan(call, st)
        if not plan:
            return
        bias_t = self._target_bias(call, st, plan)
        if self._alone(call):  # `out` computes the rows itself: reference rows as vanilla, target rows masked
            call.extras[self] = {"mode": "own", "plan": plan, "bias": bias_t, "skipped": False}
            return
        # one SDPA for all rows: the shared keys are appended to every row, −∞ for the non-target rows
        B, n, t = call.batch, plan["extra"], plan["targets"]
        if plan.get("joint_of") is not bias_t:  # built once per target mask (once per step with dropout)
            bias = call.q.new_zeros(B, 1, call.q.shape[2], plan["Lk"] + n)
            if n:
                bias[:, :, :, plan["Lk"] :] = NEG
            bias[t] = bias_t
            plan["joint_of"], plan["joint"] = bias_t, bias
        call.extras[self] = {"mode": "joint", "bias": plan["joint"]}
        if not n:
            return
        k_t, v_t = self._shared_kv(call, plan)
        k_sh = call.k.new_zeros(B, call.k.shape[1], n, call.k.shape[3])
        v_sh = call.v.new_zeros(B, call.v.shape[1], n, call.v.shape[3])
        k_sh[t], v_sh[t] = k_t, v_t
        call.k = torch.cat([call.k, k_sh], dim=2)
        call.v = torch.cat([call.v, v_sh], dim=2)
        if call.mask is not None:  # the model's own mask does not know the extra keys: they stay open
            pad = call.mask.new_zeros(call.mask.shape[:-1] + (n,))
            call.mask = torch.cat([call.mask.expand(*call.mask.shape[:-1], call.mask.shape[-1]), pad], dim=-1)

    def bias(self, call) -> torch.Tensor | None:
        ex = call.extras.get(self)
        return ex["bias"] if ex is not None and ex["mode"] == "joint" else None

    def replaced_rows(self, call) -> slice | None:
        ex = call.extras.get(self)
        if ex is None or ex["mode"] != "own":
            return None
        ex["skipped"] = True  # the layer computes no row: `out` computes them all
        return slice(0, call.batch)

    def out(self, call, o: torch.Tensor) -> torch.Tensor:
        kind = self._applies(call)
        if kind == "cross":
            return self._mutual_out(call, o)
        ex = call.extras.get(self)
        if ex is None or ex["mode"] != "own":
            return o
        if torch.is_grad_enabled():
            o = o.clone()  # keep autograd's saved tensors intact
        plan = ex["plan"]
        scale = sdpa_scale(call.scale, call.q.shape[-1])  # as the layer's own SDPA call
        B = call.batch
        r = plan["others"]
        if ex["skipped"] and len(r):  # the stock SDPA call on the reference rows: own keys, no added mask
            o[r] = F.scaled_dot_product_attention(
                call.q[r], call.k[r], call.v[r], attn_mask=_rows_of(call.mask, r, B), dropout_p=0.0, scale=scale
            )
        t, n = plan["targets"], plan["extra"]
        k, v, bias = call.k[t], call.v[t], ex["bias"]
        if n:
            k_sh, v_sh = self._shared_kv(call, plan)
            k, v = torch.cat([k, k_sh], dim=2), torch.cat([v, v_sh], dim=2)
        mask = _rows_of(call.mask, t, B)
        if mask is not None:
            mask = F.pad(mask.expand(*mask.shape[:-1], call.k.shape[2]), (0, n))
            bias = bias + mask
        o[t] = F.scaled_dot_product_attention(
            call.q[t], k, v, attn_mask=bias.to(call.q.dtype), dropout_p=0.0, scale=scale
        )
        return o

    # ---- mutual cross-attention ----------------------------------------------------------------
    def _mutual_plan(self, call, st):
        """(target rows (T,), their references' rows (T, subjects), weights m_i/Σm (T, subjects, 1, Lq, 1),
        Σm > 0 (T, 1, Lq, 1)) for a cross-attention layer shape (cached), or False."""
        run, layout = call.run, call.run.layout
        auto = self.regions(run) if self._reads else None
        key = (
            call.grid,
            call.q.shape[2],
            layout.branches,
            layout.images,
            auto is not None,
            call.q.dtype,
            call.q.device,
        )
        got = st["mutual"].get(key)
        if got is not None:
            return got
        h, w = call.grid
        subjects, Lq, qi = len(self.subjects), call.q.shape[2], call.q_image
        tgt, refs, weights = [], [], []
        for b in layout.branches:
            start = layout.rows(b).start
            for t in st["targets"]:
                cells = self._target_cells(st, call.grid, t, auto)
                if cells is None:
                    continue
                m = torch.zeros(subjects, Lq)
                m[:, qi.start : qi.start + h * w] = cells.reshape(subjects, h * w).float()
                tgt.append(start + t)
                refs.append([start + r for r in self.references])
                weights.append(m)
        if not tgt:
            st["mutual"][key] = False
            return False
        m = torch.stack(weights)  # (T, subjects, Lq)
        total = m.sum(1, keepdim=True)
        dev, dt = call.q.device, call.q.dtype
        got = (
            torch.tensor(tgt, device=dev),
            torch.tensor(refs, device=dev),
            (m / total.clamp_min(1.0))[:, :, None, :, None].to(device=dev, dtype=dt),
            (total > 0)[:, :, :, None].to(dev),
        )
        st["mutual"][key] = got
        return got

    def _mutual_out(self, call, o: torch.Tensor) -> torch.Tensor:
        """Target rows: ``(1 − λ)·O_t + λ·Σ_i m_i·softmax(Q_t K_iᵀ/√d)V_i / Σ_i m_i`` inside the regions."""
        plan = self._mutual_plan(call, call.run.store[self])
        if not plan:
            return o
        t, refs, weight, inside = plan
        T, S = refs.shape
        q = call.q[t]
        q = q[:, None].expand(T, S, *q.shape[1:]).reshape(T * S, *q.shape[1:])
        r = refs.flatten()
        scale = sdpa_scale(call.scale, call.q.shape[-1])
        o_ref = F.scaled_dot_product_attention(
            q, call.k[r], call.v[r], attn_mask=_rows_of(call.mask, r, call.batch), dropout_p=0.0, scale=scale
        )
        mixed = (o_ref.view(T, S, *o_ref.shape[1:]) * weight).sum(1)
        if torch.is_grad_enabled():
            o = o.clone()
        lam = self.mutual_cross
        o_t = o[t]
        o[t] = torch.where(inside, o_t * (1.0 - lam) + mixed * lam, o_t)
        return o

    def __repr__(self) -> str:
        return (
            f"IsolationReposition(subjects={self.subjects!r}, references={self.references!r}, isolation={self.isolation}, "
            f"reposition={self.reposition}, start_layer={self.start_layer!r}, mutual_cross={self.mutual_cross}, "
            f"dropout={self.dropout}, layers={[s.text for s in self._apply]!r}, steps={self.steps!r})"
        )


__all__: Sequence[str] = ["IsolationReposition"]
