"""`MutualSelfAttention`: MasaCtrl's mutual self-attention (on FLUX with SynPS's positional weighting).

MasaCtrl — Cao et al., "MasaCtrl: Tuning-Free Mutual Self-Attention Control for Consistent Image
Synthesis and Editing", ICCV 2023, §3.2 Eq. 4: from step S and layer L on, the target image's
self-attention queries read the *source* image's keys and values instead of its own,

    Attention(Q_t, K_s, V_s) = softmax(Q_t K_sᵀ / √d) V_s        (replace, not concatenate)

so the target keeps the source's identity and texture while its prompt changes pose or action.
Defaults from the reference code (TencentARC/MasaCtrl): S = 4 of 50 steps, L = 10, counting the
UNet's 16 self-attention layers (SD 1.x/2.x) in forward order — down, mid, up — so 10…15 are the
last two decoder blocks; for SDXL its 70 self-attention layers and L = 44 (``run_synthesis_sdxl.py``).
Every branch (unconditional, conditional, ...) uses its own source row. The mask-guided variant
(§3.3, ``MutualSelfAttentionControlMask``): with a source foreground mask M_s and a target mask M_t,
``O = M_t·A(Q_t, K_s^fg, V_s^fg) + (1 − M_t)·A(Q_t, K_s^bg, V_s^bg)`` (fore- and background keep
apart).

FLUX — SynPS (`attnctrl.controls.synps`): the target shares in SynPS's 13 blocks, its queries and the
source's keys at RoPE positions scaled by a weight its editing measure sets after every step; from the
first step. SD3 gets plain mutual attention (no reference exists; the second half of its layers by
default).

Start noise: both reference implementations expand one start code to every prompt (MasaCtrl's
playgrounds ``start_code.expand(len(prompts), ...)``; SynPS ``repeat(img, "1 ... -> bs ...")``), so
with ``same_noise`` (default) every image starts from the source image's start latents: a target
whose prompt is the source's reproduces the source.

Automatic masks (``mask_tokens=``, MasaCtrl's ``MutualSelfAttentionControlMaskAuto``): at every step,
the conditional rows' head-averaged cross-attention probabilities of the layers at 1/4 of the token
grid (MasaCtrl's 16×16 at 512 px) run so far in this step are averaged over layers, summed over the
chosen tokens (the source prompt's tokens for the source row, the target tokens for each target),
min-max normalised per image, resized (nearest) to each layer's grid and thresholded (``≥ 0.1``): the
source's mask splits its keys into fore- and background, each target's own mask blends the two
outputs as in the mask-guided variant. A layer that runs before any such map of its step
uses plain mutual attention (as the reference does).

Real images: ``source_image=`` inverts the image with the run's ``run.invert`` (DDIM inversion to every
timestep of the run, `attnctrl.inversion.invert_trajectory`, as SharedAttention's ``reference_image``;
SD/SDXL under any variance-preserving scheduler: DDIM, PNDM, DPM-Solver, ...) under ``source_prompt``
(default: the source row's prompt) with guidance ``inversion_guidance``; every row starts from the
inverted latents of the first timestep (MasaCtrl's ``latents=start_code`` expanded to every prompt; only
the source row with ``same_noise=False``), and at every step i the source row is put back on the
trajectory, at the latents of the run's i-th timestep (``pin_source``, MasaCtrl's ``ref_intermediate_latents``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from ..attention_block import ProbsBlock, image_text_block
from ..control import Control
from ..params import WORDS, Range
from ..regions import check_masks
from ..selectors import SelectorLike, as_selectors
from .mutual_layers import MASACTRL_START_LAYER, narrow, shares_here, sharing_layers
from .mutual_masks import (
    _NAME,
    MASK_FACTOR,
    add_maps,
    auto_cells,
    auto_masks,
    given_cells,
    masked,
    resolve_tokens,
    step_index,
    token_list,
)
from .mutual_source import invert, start_latents
from .synps import SynPS

__all__ = ["MASACTRL_START_LAYER", "MASK_FACTOR", "MutualSelfAttention", "auto_masks"]


class MutualSelfAttention(Control):
    """Mutual self-attention (MasaCtrl, ICCV 2023); on FLUX with SynPS positional modulation.

    Args:
        source: index of the source image in the batch (its rows stay exactly as without the control).
        start_step: first step of mutual attention (None: 4, MasaCtrl; 0 on FLUX, SynPS).
        start_layer: first self-attention layer, counted from 0 in forward order (None: 10 on SD,
            44 on SDXL (MasaCtrl); FLUX: SynPS's 13 blocks; SD3: the second half).
        layers: a selector instead of start_layer (self-attention layers).
        steps: a (start, stop) step range instead of start_step.
        source_mask: foreground mask (H, W) of the source, for the mask-guided variant (with target_mask).
        target_mask: foreground mask (H, W) of the target(s).
        source_image: a real image (path or PIL image) to invert as the source (SD/SDXL, any
            variance-preserving scheduler).
        source_prompt: prompt for the inversion (default: the source row's prompt).
        inversion_guidance: guidance scale of the inversion.
        pin_source: put the inverted latents in the source row at every step (False: only at step 0).
        pe_modulation: FLUX: SynPS's positional-embedding weight driven by its editing measure.
        pe_min: SynPS's lower threshold τ_min.
        pe_max: SynPS's upper threshold τ_max.
        same_noise: every image starts from the source's start latents (or the inverted ones), as MasaCtrl and SynPS do.
        mask_tokens: words of the source prompt whose cross-attention gives the masks (MasaCtrl's MaskAuto; SD/SDXL).
        target_mask_tokens: words of the target prompts for their masks (default: mask_tokens).
        mask_threshold: threshold of the min-max normalised maps (MaskAuto: 0.1).
    """

    name = "mutual"
    effects = frozenset({"replaces_kv"})  # the targets' keys/values are the source row's
    default_layers = "self"

    def __init__(
        self,
        source: Annotated[int, Range(0)] = 0,
        start_step: Annotated[int | None, Range(0)] = None,
        start_layer: Annotated[int | None, Range(0)] = None,
        layers: SelectorLike | None = None,
        steps=None,
        source_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        source_image: str | None = None,
        source_prompt: str | None = None,
        inversion_guidance: Annotated[float, Range(1)] = 1.0,
        pin_source: bool = True,
        pe_modulation: bool = True,
        pe_min: float = 0.9,
        pe_max: float = 1.0,
        same_noise: bool = True,
        mask_tokens: Annotated[str | list[str] | None, WORDS] = None,
        target_mask_tokens: Annotated[str | list[str] | None, WORDS] = None,
        mask_threshold: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.1,
    ):
        if layers is not None and start_layer is not None:
            raise ValueError("give either layers= or start_layer=, not both")
        if steps is not None and start_step is not None:
            raise ValueError("give either steps= or start_step=, not both")
        if (source_mask is None) != (target_mask is None):
            raise ValueError("the mask-guided variant needs both source_mask and target_mask")
        if not (isinstance(pe_min, (int, float)) and isinstance(pe_max, (int, float)) and pe_min < pe_max):
            raise ValueError(f"pe_min must be < pe_max, got {pe_min!r}, {pe_max!r}")
        if source_prompt is not None and source_image is None:
            raise ValueError("source_prompt is the inversion prompt: it needs source_image=")
        mask_tokens = token_list(mask_tokens, "mask_tokens")
        target_mask_tokens = token_list(target_mask_tokens, "target_mask_tokens")
        if target_mask_tokens is not None and mask_tokens is None:
            raise ValueError("target_mask_tokens needs mask_tokens= (the source's words)")
        if mask_tokens is not None and source_mask is not None:
            raise ValueError("give either source_mask/target_mask or mask_tokens (masks from attention), not both")
        sel = None
        if mask_tokens is not None:  # also plan the cross-attention layers the masks are read from
            sel = [x.text for x in as_selectors(self.default_layers if layers is None else layers)] + ["cross"]
        super().__init__(layers=layers if sel is None else sel, steps=steps)
        self.source, self.start_step, self.start_layer = source, start_step, start_layer
        self._user_layers = layers
        self.source_mask, self.target_mask = source_mask, target_mask
        self.source_image, self.source_prompt = source_image, source_prompt
        self.inversion_guidance, self.pin_source = float(inversion_guidance), bool(pin_source)
        self.pe_modulation, self.pe_min, self.pe_max = bool(pe_modulation), float(pe_min), float(pe_max)
        self.synps = SynPS(self.pe_min, self.pe_max)
        self.same_noise = same_noise
        self.mask_tokens, self.target_mask_tokens = mask_tokens, target_mask_tokens
        self.mask_threshold = float(mask_threshold)

    # ---- where and when ------------------------------------------------------------------------
    def narrow_layers(self, picked: list, grid) -> list:
        return narrow(self, picked, grid)

    def sharing_layers(self, order: list, family: str) -> list:
        """The layers that share among `order` (self-attention layers in forward order) without `layers=`:
        SynPS's blocks on FLUX, else from `start_layer` on (default 10 on SD, 44 on SDXL, the second half)."""
        return sharing_layers(self, order, family)

    def check_layers(self, picked) -> None:
        if not any(lay.has_part("self") for lay, _ in picked):
            raise ValueError(f"{_NAME} shares self-attention; the selector picks no self-attention layer")

    def attends(self, run) -> bool:
        """Inside the step window: `steps` when given, else from step `start_step` on (default 4, MasaCtrl's
        S; 0 on FLUX, SynPS), which depends on the run's family."""
        if self.steps is not None or run.state is None:
            return self.active(run.state)
        return run.state.index >= run.store[self]["start"]

    # ---- loop hooks ----------------------------------------------------------------------------
    def loop_hooks(self) -> tuple[str, ...]:
        """The loop hooks this control needs: `before_step` for one start noise (`same_noise`) or a real
        source image; none with ``same_noise=False`` and a generated source (then it also runs under
        `ac.attach` and in inference mode)."""
        return ("before_step",) if self.same_noise or self.source_image is not None else ()

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        n = run.layout.images
        if self.source >= n:
            raise ValueError(f"{_NAME}: source={self.source} is outside the batch of {n} image(s) (indices 0..{n - 1})")
        flux = run.family == "flux"
        st: dict[str, Any] = {
            "rows": {},
            **SynPS.fresh(),
            "cells": {},
            "maps": None,
            "auto": None,
            "start": self.start_step if self.start_step is not None else (0 if flux else 4),
        }
        if self.source_mask is not None:
            sizes = [s for s in (run.pixel_size, tuple(run.grid)) if s is not None]
            st["masks"] = (
                check_masks(self.source_mask, 1, sizes, "source_mask"),
                check_masks(self.target_mask, 1, sizes, "target_mask"),
            )
        if self.mask_tokens is not None:
            st["tokens"] = resolve_tokens(self, run)
        st["modulate"] = flux and self.pe_modulation and bool(run.timesteps)  # ac.attach: plain mutual attention
        if self.source_image is not None:
            st["inverted"] = invert(self, run)
        run.store[self] = st

    def end(self, run) -> None:
        run.store.pop(self, None)

    # ---- start latents -------------------------------------------------------------------------
    def before_step(self, run, latents, denoise):
        """Step 0: every row starts from the source's latents (or the inverted ones); the inverted source
        row is pinned to the trajectory (`at_step(i)`: the latents at the run's i-th timestep)."""
        return start_latents(self, run, latents)

    # ---- attention -----------------------------------------------------------------------------
    def _rows(self, call) -> dict | None:
        """{"src": row → its branch's source row, "target": bool target rows, "t": target row indices,
        "img": their image indices}, or None with one image."""
        layout = call.run.layout
        if layout.images < 2:
            return None
        st = call.run.store[self]
        key = (layout.branches, layout.images, call.q.device)
        got = st["rows"].get(key)
        if got is None:
            idx = torch.arange(layout.size)
            for b in layout.branches:
                r = layout.rows(b)
                idx[r] = r.start + self.source
            target = idx != torch.arange(layout.size)
            t = target.nonzero().flatten()
            dev = call.q.device
            got = st["rows"][key] = {
                "src": idx.to(dev),
                "target": target.to(dev),
                "t": t.to(dev),
                "img": (t % layout.images).to(dev),
            }
        return got

    def qkv(self, call) -> None:
        rows = self._rows(call)
        if rows is None:
            return
        st = call.run.store[self]
        if st["modulate"]:
            self.synps.new_step(st, step_index(call.run))
        if not shares_here(self, call, st):
            return  # a layer read only for SynPS's measure or MaskAuto's maps
        idx = rows["src"]
        ki = call.k_image
        if call.k_text is None and ki.start == 0 and ki.stop >= call.k.shape[2]:
            call.k, call.v = call.k[idx], call.v[idx]  # source rows map to themselves
        else:  # joint attention: the target keeps its own text keys
            k, v = call.k.clone(), call.v.clone()
            k[:, :, ki], v[:, :, ki] = call.k[idx][:, :, ki], call.v[idx][:, :, ki]
            call.k, call.v = k, v
        if st["modulate"]:
            self.synps.reposition(call, st, rows["t"])

    # ---- MaskAuto: maps from cross-attention -----------------------------------------------------
    def reads(self, call) -> ProbsBlock | None:
        # the plan's cross-attention layers are the ones `narrow_layers` kept for the maps
        if self.mask_tokens is None or call.layer.kind != "cross":
            return None
        return image_text_block(call)

    def observe(self, call, block: torch.Tensor) -> None:
        """Add this layer's head-averaged maps of the chosen tokens (conditional rows) to the step's sum."""
        add_maps(self, call, block)

    def out(self, call, o: torch.Tensor) -> torch.Tensor:
        rows = self._rows(call)
        if rows is None:
            return o
        st = call.run.store[self]
        if "masks" in st:
            if shares_here(self, call, st):
                o = masked(call, o, rows, given_cells(call, st))
        elif self.mask_tokens is not None and call.k_text is None and shares_here(self, call, st):
            cells = auto_cells(self, call, st)
            if cells is not None:
                o = masked(call, o, rows, cells)
        if st["modulate"] and call.q_text is not None and call.run.layout.has("cond"):
            self.synps.measure(call, st, o, rows["src"], rows["target"])
        return o
