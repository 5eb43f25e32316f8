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

from typing import Any

import torch
import torch.nn.functional as F

from ..control import Control
from ..images import open_image
from ..layers import forward_order, list_layers
from ..regions import check_masks, mask_cells
from ..selectors import SelectorLike, as_selectors
from .synps import SynPS, synps_layers

MASACTRL_START_LAYER = {"sd": 10, "sdxl": 44}
#: MaskAuto reads the cross-attention at 1/4 of the input token grid (MasaCtrl: 16×16 at 512 px)
MASK_FACTOR = 4
_NAME = "MutualSelfAttention"
_LOOP_HOOKS = ("branches", "combine", "before_step", "after_step")


def _family_of_layers(layers: list) -> str:
    places = {lay.place for lay in layers}
    if places & {"down", "mid", "up"}:
        # SDXL's first down block has no attention: its first self-attention runs at 1/2 resolution
        first = min((lay.factor for lay in layers if lay.place == "down"), default=1)
        return "sdxl" if first >= 2 else "sd"
    return "flux" if "single" in places else "sd3"


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


def _token_list(value, what: str) -> list | None:
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
    observes_only = True  # `probs` only reads the cross-attention maps of mask_tokens

    def __init__(
        self,
        source: int = 0,
        start_step: int | None = None,
        start_layer: int | None = None,
        layers: SelectorLike | None = None,
        steps=None,
        source_mask: torch.Tensor | None = None,
        target_mask: torch.Tensor | None = None,
        source_image: str | None = None,
        source_prompt: str | None = None,
        inversion_guidance: float = 1.0,
        pin_source: bool = True,
        pe_modulation: bool = True,
        pe_min: float = 0.9,
        pe_max: float = 1.0,
        same_noise: bool = True,
        mask_tokens: str | list[str] | None = None,
        target_mask_tokens: str | list[str] | None = None,
        mask_threshold: float = 0.1,
    ):
        for name, v in (("source", source), ("start_step", start_step), ("start_layer", start_layer)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
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
        if not isinstance(same_noise, bool):
            raise ValueError(f"same_noise must be True or False, got {same_noise!r}")
        mask_tokens = _token_list(mask_tokens, "mask_tokens")
        target_mask_tokens = _token_list(target_mask_tokens, "target_mask_tokens")
        if target_mask_tokens is not None and mask_tokens is None:
            raise ValueError("target_mask_tokens needs mask_tokens= (the source's words)")
        if mask_tokens is not None and source_mask is not None:
            raise ValueError("give either source_mask/target_mask or mask_tokens (masks from attention), not both")
        if not (
            isinstance(mask_threshold, (int, float))
            and not isinstance(mask_threshold, bool)
            and 0.0 < mask_threshold < 1.0
        ):
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold!r}")
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
        reads = self.mask_tokens is not None
        cross = [(lay, h) for lay, h in picked if reads and lay.kind == "cross" and lay.factor == MASK_FACTOR]
        picked = [(lay, h) for lay, h in picked if lay.has_part("self")]
        if not picked:
            return picked
        order = forward_order([lay for lay, _ in picked])
        family = _family_of_layers(order)
        if reads and family not in ("sd", "sdxl"):
            raise NotImplementedError(
                f"{_NAME}: mask_tokens (MasaCtrl's automatic masks) supports SD and SDXL UNets, not {family}"
            )
        if reads and not cross:
            raise ValueError(
                f"{_NAME}: mask_tokens reads cross-attention at 1/{MASK_FACTOR} of the token grid (MasaCtrl's 16x16 at "
                "512 px); this model has no cross-attention layer there"
            )
        if self._user_layers is not None:
            return picked + cross
        chosen = {lay.name for lay in self.sharing_layers(order, family)}
        if family == "flux" and self.pe_modulation:
            return picked  # SynPS's measure reads every block; `_shares` picks the sharing ones
        return [(lay, h) for lay, h in picked if lay.name in chosen] + cross

    def sharing_layers(self, order: list, family: str) -> list:
        """The layers that share among `order` (self-attention layers in forward order) without `layers=`:
        SynPS's blocks on FLUX, else from `start_layer` on (default 10 on SD, 44 on SDXL, the second half)."""
        if family == "flux" and self.start_layer is None:
            chosen = synps_layers(order)
        else:
            start = self.start_layer
            if start is None:
                start = MASACTRL_START_LAYER.get(family, len(order) // 2)
            if start >= len(order):
                raise ValueError(
                    f"{_NAME}: start_layer={start} but this model has {len(order)} self-attention layers "
                    f"(counted from 0 in forward order); give a smaller start_layer or layers="
                )
            chosen = order[start:]
        if not chosen:
            raise ValueError(
                f"{_NAME}: no layer of SynPS's block set exists in this model; give start_layer or layers="
            )
        return chosen

    def check_layers(self, picked) -> None:
        if not any(lay.has_part("self") for lay, _ in picked):
            raise ValueError(f"{_NAME} shares self-attention; the selector picks no self-attention layer")

    def attends(self, run) -> bool:
        """Inside the step window: `steps` when given, else from step `start_step` on (default 4, MasaCtrl's
        S; 0 on FLUX, SynPS), which depends on the run's family."""
        if self.steps is not None or run.state is None:
            return self.active(run.state)
        return run.state.index >= run.store[self]["start"]

    def _shares(self, call, st) -> bool:
        """Whether this layer reads the source's keys: not a cross-attention layer read for MaskAuto's maps
        and, where SynPS's measure reads every FLUX block, one of the sharing blocks."""
        if call.layer.kind == "cross":
            return False
        run = call.run
        if self._user_layers is not None or not self.pe_modulation or run.family != "flux":
            return True  # the plan holds just the sharing layers (and the maps' cross-attention)
        got = st.get("sharing")
        if got is None or got[0] is not run.plan:  # once per plan (ac.attach plans again for a new grid)
            mine = {name for name, entries in run.plan.items() if any(c is self for c, _ in entries)}
            order = forward_order(
                [lay for lay in list_layers(run.denoiser) if lay.name in mine and lay.has_part("self")]
            )
            got = st["sharing"] = (run.plan, frozenset(lay.name for lay in self.sharing_layers(order, "flux")))
        return call.layer.name in got[1]

    # ---- loop hooks ----------------------------------------------------------------------------
    def loop_hooks(self) -> tuple[str, ...]:
        """The loop hooks this control needs: `before_step` for one start noise (`same_noise`) or a real
        source image; none with ``same_noise=False`` and a generated source (then it also runs under
        `ac.attach` and in inference mode)."""
        return ("before_step",) if self.same_noise or self.source_image is not None else ()

    def implements(self, hook: str) -> bool:
        """As `Control.implements`; a loop hook only if `loop_hooks` names it."""
        if hook in _LOOP_HOOKS:
            return hook in self.loop_hooks()
        return super().implements(hook)

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
            st["tokens"] = self._resolve_tokens(run)
        st["modulate"] = flux and self.pe_modulation and bool(run.timesteps)  # ac.attach: plain mutual attention
        if self.source_image is not None:
            st["inverted"] = self._invert(run)
        run.store[self] = st

    def _resolve_tokens(self, run) -> list[list[int]]:
        """Token indices per image: the source's mask_tokens in its prompt, the target tokens in each target's."""
        run.needs_text(f"{_NAME}(mask_tokens=)")
        out = []
        for img in range(run.layout.images):
            words = self.mask_tokens if img == self.source else (self.target_mask_tokens or self.mask_tokens)
            idx: list[int] = []
            for w in words or ():
                idx += [i for i in run.tokens(img, w) if i not in idx]
            out.append(idx)
        return out

    def _invert(self, run):
        """The source image inverted to every timestep of the run (`run.invert`)."""
        if run.invert is None:
            raise ValueError("source_image needs ControlledPipeline (the inverted latents enter its loop)")
        if run.family not in ("sd", "sdxl"):
            raise NotImplementedError(f"source_image (DDIM inversion) supports SD and SDXL, not {run.family}")
        image = open_image(self.source_image, what="source image")
        prompt = self.source_prompt or run.prompt_of(self.source)
        h, w = run.pixel_size
        return run.invert(image, prompt, guidance_scale=self.inversion_guidance, height=h, width=w)

    def end(self, run) -> None:
        run.store.pop(self, None)

    # ---- start latents -------------------------------------------------------------------------
    def before_step(self, run, latents, denoise):
        """Step 0: every row starts from the source's latents (or the inverted ones); the inverted source
        row is pinned to the trajectory (`at_step(i)`: the latents at the run's i-th timestep)."""
        st, index = run.store.get(self), run.state.index
        inverted = None if st is None else st.get("inverted")
        if index == 0 and self.same_noise and latents.shape[0] > 1:
            start = latents[self.source] if inverted is None else inverted.at_step(0)[0]
            latents = start.to(latents.device, latents.dtype).expand_as(latents).clone()
        if inverted is not None and (self.pin_source or index == 0):
            latents = latents.clone()
            latents[self.source] = inverted.at_step(index)[0].to(latents.device, latents.dtype)
        return latents

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
            self.synps.new_step(st, _index(call.run))
        if not self._shares(call, st):
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
    def needs_probs(self, call) -> bool:
        # the plan's cross-attention layers are the ones `narrow_layers` kept for the maps
        reads = self.mask_tokens is not None and call.layer.kind == "cross"
        return reads and call.run.layout.has("cond") and not torch.is_grad_enabled()

    def probs(self, call, p: torch.Tensor) -> torch.Tensor:
        """Add this layer's head-averaged maps of the chosen tokens (conditional rows) to the step's sum."""
        st = call.run.store[self]
        index = _index(call.run)
        block = p[call.run.layout.rows("cond"), :, call.q_image, call.k_text].float().mean(dim=1)  # (images, L, T)
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
        return p

    def _auto_cells(self, call, st):
        """(source key mask (L,), target blend masks (images, L)) at this layer from this step's maps, or None."""
        acc = st["maps"]
        index = _index(call.run)
        if acc is None or acc["step"] != index:
            return None  # no map of this step yet: plain mutual attention, as the reference
        key = (index, acc["count"], tuple(call.grid))
        got = st["auto"]
        if got is None or got[0] != key:
            masks = auto_masks(acc["sum"] / acc["count"], acc["grid"], call.grid, self.mask_threshold)
            got = st["auto"] = (key, (masks[self.source].to(call.q.device), masks.float().to(call.q.device)))
        return got[1]

    def _cells(self, call, st):
        """(source key mask (L,), target blend masks (1, L)) from the user's masks at this layer's grid."""
        key = call.grid
        got = st["cells"].get(key)
        if got is None:
            ms, mt = st["masks"]
            s = mask_cells(ms, call.grid, exclusive=False)[0].flatten()
            t = mask_cells(mt, call.grid, exclusive=False)[0].flatten().float()
            got = st["cells"][key] = (s.to(call.q.device), t[None].to(call.q.device))
        return got

    def out(self, call, o: torch.Tensor) -> torch.Tensor:
        rows = self._rows(call)
        if rows is None:
            return o
        st = call.run.store[self]
        if "masks" in st:
            if self._shares(call, st):
                o = self._masked(call, o, rows, self._cells(call, st))
        elif self.mask_tokens is not None and call.k_text is None and self._shares(call, st):
            cells = self._auto_cells(call, st)
            if cells is not None:
                o = self._masked(call, o, rows, cells)
        if st["modulate"] and call.q_text is not None and call.run.layout.has("cond"):
            self.synps.measure(call, st, o, rows["src"], rows["target"])
        return o

    def _masked(self, call, o, rows, cells):
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

    def __repr__(self) -> str:
        return (
            f"MutualSelfAttention(source={self.source}, start_step={self.start_step}, start_layer={self.start_layer}, "
            f"layers={self._user_layers!r}, steps={self.steps!r}, same_noise={self.same_noise}, mask_tokens={self.mask_tokens!r})"
        )


def _index(run) -> int:
    """The run's step index (0 before the first step)."""
    return run.state.index if run.state is not None else 0
