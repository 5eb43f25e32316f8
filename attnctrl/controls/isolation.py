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
from typing import Annotated, Any

import torch

from ..attention_block import ProbsBlock, image_text_block
from ..control import Control
from ..params import WORDS, Range
from ..regions import parse_boxes
from ..selectors import SelectorLike, as_selectors
from .isolation_attention import dropout_keep, joint_kv, move_rope, mutual_out, own_rows, target_bias
from .isolation_layers import SDXL_START_LAYER, alone, default_start_layer, matches, mutual_matches, sharing
from .isolation_regions import add_maps, auto_regions, check_regions, resolve_tokens, row_plan

__all__: Sequence[str] = ["SDXL_START_LAYER", "IsolationReposition", "default_start_layer", "dropout_keep", "move_rope"]


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

    def __init__(
        self,
        subjects: Annotated[list[str], WORDS],
        references: list[int] | None = None,
        boxes: str | None = None,
        masks: torch.Tensor | None = None,
        reference_boxes: str | None = None,
        reference_masks: torch.Tensor | None = None,
        isolation: bool = True,
        reposition: bool = True,
        start_layer: Annotated[int | None, Range(0)] = None,
        mutual_cross: Annotated[float, Range(0, 1)] = 0.9,
        dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.5,
        seed: Annotated[int, Range(0)] = 0,
        threshold: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.5,
        mask_step: Annotated[int, Range(0)] = 4,
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
    def narrow_layers(self, picked: list, grid) -> list:
        # the self-attention layers of the user's selector, the cross-attention layers of the mutual
        # cross-attention, and the cross-attention read for maps
        kept = [
            (lay, h)
            for lay, h in picked
            if matches(self, lay, grid) or mutual_matches(self, lay, grid) or (self._reads and lay.has_part("cross"))
        ]
        sharing(self, [lay for lay, _ in picked])  # a start_layer beyond the layers fails here, before any step
        return kept

    def check_layers(self, picked) -> None:
        if not any(matches(self, layer) for layer, _ in picked):
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
                if matches(self, call.layer, grid)
                else "cross"
                if mutual_matches(self, call.layer, grid)
                else None
            )
        return st["applies"][name]

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        n_img, n = run.layout.images, len(self.subjects)
        refs = self.references or []
        bad = [r for r in refs if r >= n_img]
        if bad:
            raise ValueError(
                f"{type(self).__name__}: reference image(s) {bad} outside the batch of {n_img} image(s) (indices 0..{n_img - 1})"
            )
        boxes, ref_boxes, masks, ref_masks = check_regions(self, run, n)
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
            st["tokens"] = resolve_tokens(self, run, st["targets"])
        run.store[self] = st

    def end(self, run) -> None:
        run.store.pop(self, None)

    # ---- the map reader (regions from attention) -----------------------------------------------
    def reads(self, call) -> ProbsBlock | None:
        if not self._reads or call.run.state is None or call.run.state.index >= self.mask_step:
            return None
        return image_text_block(call)

    def observe(self, call, block: torch.Tensor) -> None:
        add_maps(self, call, block)

    def regions(self, run) -> torch.Tensor | None:
        """The regions derived from attention, (images, subjects, H, W) 0/1 at the run's token grid, once
        steps [0, mask_step) have been read (computed once per run); None before, or when all are given."""
        return auto_regions(self, run)

    # ---- attention -----------------------------------------------------------------------------
    def qkv(self, call) -> None:
        if self._applies(call) != "self":
            return
        st = call.run.store[self]
        plan = row_plan(self, call, st)
        if not plan:
            return
        bias_t = target_bias(self, call, st, plan)
        if alone(self, call):  # `out` computes the rows itself: reference rows as vanilla, target rows masked
            call.extras[self] = {"mode": "own", "plan": plan, "bias": bias_t, "skipped": False}
            return
        call.extras[self] = {"mode": "joint", "bias": joint_kv(call, plan, bias_t)}

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
            return mutual_out(self, call, o)
        ex = call.extras.get(self)
        if ex is None or ex["mode"] != "own":
            return o
        return own_rows(call, ex, o)
