"""`MutualSelfAttention`: MasaCtrl's mutual self-attention, with SynPS's positional modulation on FLUX.

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

FLUX — SynPS (Chen et al., "The Devil is in Attention Sharing", arXiv 2512.14423, reference code
zhuochen02/SynPS): in 13 of the 57 blocks (double 0, 7, 8, 9, 10, 18; single 6, 9, 18, 23, 26, 31, 37
counted from 19 on) the target attends to ``[its own text; the source's image]`` keys/values, with
target queries and those keys rotated by RoPE at positions scaled by a weight w (``ids·w``; w = 0
drops positional cues, w = 1 keeps them). The *editing measure* after each step is the mean over all
blocks of ``cos(O_s^img, O_t^img) / cos(O_s^txt, O_t^txt)`` (attention outputs of source and target),
and the next step uses ``w = clip((τ_max − m) / (τ_max − τ_min), 0, 1)`` (τ_min = 0.9, τ_max = 1.0;
w = 1 at the first step). SynPS shares from the first step. SD3 gets plain mutual attention (no
reference exists; the second half of its layers by default).

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

Real images: ``source_image=`` inverts the image with `attnctrl.inversion.ddim_invert` (SD/SDXL,
DDIM scheduler) under ``source_prompt`` (default: the source row's prompt); every row starts from the
inverted z_T (MasaCtrl's ``latents=start_code`` expanded to every prompt; only the source row with
``same_noise=False``), and the source row is put back on the inversion trajectory at every step by
default (``pin_source``, MasaCtrl's ``ref_intermediate_latents``).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from ..control import Control
from ..regions import check_masks, mask_cells, pixel_size
from ..selectors import SelectorLike, as_selectors
from .isolation import rotate

_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2, "blocks": 3, "single": 4}
#: SynPS's blocks (forward order over FLUX's 19 double + 38 single blocks)
SYNPS_BLOCKS = frozenset({0, 7, 8, 9, 10, 18, 25, 28, 37, 42, 45, 50, 56})
MASACTRL_START_LAYER = {"sd": 10, "sdxl": 44}
#: MaskAuto reads the cross-attention at 1/4 of the input token grid (MasaCtrl: 16×16 at 512 px)
MASK_FACTOR = 4
_NAME = "MutualSelfAttention"


def forward_order(layers: list) -> list:
    """Layers in the order a forward pass runs them: down, mid, up (UNet); double, single (FLUX)."""
    return sorted(layers, key=lambda lay: _PLACE_ORDER.get(lay.place, 5))


def _family_of_layers(layers: list) -> str:
    places = {lay.place for lay in layers}
    if places & {"down", "mid", "up"}:
        # SDXL's first down block has no attention: its first self-attention runs at 1/2 resolution
        first = min((lay.factor for lay in layers if lay.place == "down"), default=1)
        return "sdxl" if first >= 2 else "sd"
    return "flux" if "single" in places else "sd3"


def auto_masks(maps: torch.Tensor, map_grid: tuple[int, int], grid: tuple[int, int], threshold: float = 0.1) -> torch.Tensor:
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
    ok = items and all((isinstance(t, str) and t.strip()) or (isinstance(t, int) and not isinstance(t, bool)) for t in items)
    if not ok:
        raise ValueError(f"{what} must be a word or phrase of the prompt (or a list of them, or token indices), got {value!r}")
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
        source_image: a real image (path or PIL image) to invert as the source (SD/SDXL, DDIM scheduler).
        source_prompt: prompt for the inversion (default: the source row's prompt).
        inversion_guidance: guidance scale of the inversion.
        pin_source: put the inverted latents in the source row at every step (False: only at step 0).
        pe_modulation: FLUX: SynPS's positional-embedding weight driven by its editing measure.
        pe_min: SynPS's lower threshold τ_min.
        pe_max: SynPS's upper threshold τ_max.
        same_noise: every image starts from the source's start latents (or the inverted z_T), as MasaCtrl and SynPS do.
        mask_tokens: words of the source prompt whose cross-attention gives the masks (MasaCtrl's MaskAuto; SD/SDXL).
        target_mask_tokens: words of the target prompts for their masks (default: mask_tokens).
        mask_threshold: threshold of the min-max normalised maps (MaskAuto: 0.1).
    """

    name = "mutual"
    default_layers = "self"
    observes_only = True  # `probs` only reads the cross-attention maps of mask_tokens

    def __new__(cls, *args, **kwargs):
        # the start-noise and real-image hooks run in the loop (`before_step`); with same_noise=False
        # and a generated source the control keeps none, so it also works with `ac.attach` and
        # inference mode
        kind = cls
        if cls is MutualSelfAttention:
            try:
                given = inspect.signature(cls.__init__).bind(None, *args, **kwargs).arguments
            except TypeError:
                given = kwargs  # __init__ reports the bad call
            if given.get("same_noise", True) is False and given.get("source_image") is None:
                kind = _NoLatentHookMutual
        return super().__new__(kind)

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
        if not (isinstance(mask_threshold, (int, float)) and not isinstance(mask_threshold, bool) and 0.0 < mask_threshold < 1.0):
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold!r}")
        sel = None
        if mask_tokens is not None:  # also plan the cross-attention layers the masks are read from
            sel = [x.text for x in as_selectors(self.default_layers if layers is None else layers)] + ["cross"]
        super().__init__(layers=layers if sel is None else sel, steps=steps)
        self.source, self.start_step, self.start_layer = source, start_step, start_layer
        self._user_layers, self._user_steps = layers, steps
        self.source_mask, self.target_mask = source_mask, target_mask
        self.source_image, self.source_prompt = source_image, source_prompt
        self.inversion_guidance, self.pin_source = float(inversion_guidance), bool(pin_source)
        self.pe_modulation, self.pe_min, self.pe_max = bool(pe_modulation), float(pe_min), float(pe_max)
        self.same_noise = same_noise
        self.mask_tokens, self.target_mask_tokens = mask_tokens, target_mask_tokens
        self.mask_threshold = float(mask_threshold)
        self._names: frozenset[str] | None = None  # layers that share (None: every planned layer)
        self._readers: frozenset[str] = frozenset()  # cross-attention layers read for the masks
        self._run_store: dict | None = None  # this run's state, for `before_step` (the loop gives it no run)

    # ---- where ---------------------------------------------------------------------------------
    def narrow_layers(self, picked: list, grid) -> list:
        reads = self.mask_tokens is not None
        cross = [(lay, h) for lay, h in picked if reads and lay.kind == "cross" and lay.factor == MASK_FACTOR]
        picked = [(lay, h) for lay, h in picked if lay.has_part("self")]
        self._readers = frozenset(lay.name for lay, _ in cross)
        if not picked:
            self._names = None
            return picked
        order = forward_order([lay for lay, _ in picked])
        family = _family_of_layers(order)
        if reads and family not in ("sd", "sdxl"):
            raise NotImplementedError(f"{_NAME}: mask_tokens (MasaCtrl's automatic masks) supports SD and SDXL UNets, not {family}")
        if reads and not cross:
            raise ValueError(
                f"{_NAME}: mask_tokens reads cross-attention at 1/{MASK_FACTOR} of the token grid (MasaCtrl's 16x16 at "
                "512 px); this model has no cross-attention layer there"
            )
        if self._user_layers is not None:
            self._names = frozenset(lay.name for lay, _ in picked) if reads else None
            return picked + cross
        if family == "flux" and self.start_layer is None:
            chosen = [lay for i, lay in enumerate(order) if i in SYNPS_BLOCKS]
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
            raise ValueError(f"{_NAME}: no layer of SynPS's block set exists in this model; give start_layer or layers=")
        self._names = frozenset(lay.name for lay in chosen)
        if family == "flux" and self.pe_modulation:
            return picked  # SynPS's measure reads every block
        return [(lay, h) for lay, h in picked if lay.name in self._names] + cross

    def check_layers(self, picked) -> None:
        if not any(lay.has_part("self") for lay, _ in picked):
            raise ValueError(f"{_NAME} shares self-attention; the selector picks no self-attention layer")

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        n = run.layout.images
        if self.source >= n:
            raise ValueError(f"{_NAME}: source={self.source} is outside the batch of {n} image(s) (indices 0..{n - 1})")
        flux = run.family == "flux"
        if self._user_steps is None:
            start = self.start_step if self.start_step is not None else (0 if flux else 4)
            self.steps = (start, 1.0)
        st: dict[str, Any] = {"rows": {}, "w": 1.0, "sum": None, "count": 0, "step": -1, "rope": {}, "cells": {},
                              "maps": None, "auto": None}
        if self.source_mask is not None:
            sizes = [s for s in (pixel_size(run), tuple(run.grid)) if s is not None]
            st["masks"] = (check_masks(self.source_mask, 1, sizes, "source_mask"), check_masks(self.target_mask, 1, sizes, "target_mask"))
        if self.mask_tokens is not None:
            st["tokens"] = self._resolve_tokens(run)
        st["modulate"] = flux and self.pe_modulation and run.store.get("pipeline") is not None
        if self.source_image is not None:
            st["inverted"] = self._invert(run)
        run.store[self] = st
        self._run_store = st

    def _resolve_tokens(self, run) -> list[list[int]]:
        """Token indices per image: the source's mask_tokens in its prompt, the target tokens in each target's."""
        from ..tokens import joint_text_indices

        pipe = run.store.get("pipeline")
        if pipe is None or not run.prompts:
            raise ValueError(f"{_NAME}: mask_tokens needs ControlledPipeline (the words are looked up in the prompts)")
        per = max(run.layout.images // len(run.prompts), 1)
        out = []
        for img in range(run.layout.images):
            prompt = run.prompts[min(img // per, len(run.prompts) - 1)]
            words = self.mask_tokens if img == self.source else (self.target_mask_tokens or self.mask_tokens)
            idx: list[int] = []
            for w in words:
                idx += [i for i in joint_text_indices(pipe.pipe, prompt, w, run.family) if i not in idx]
            out.append(idx)
        return out

    def _invert(self, run):
        from ..inversion import ddim_invert

        pipe = run.store.get("pipeline")
        if pipe is None:
            raise ValueError("source_image needs ControlledPipeline (the inverted latents enter its loop)")
        if run.family not in ("sd", "sdxl"):
            raise NotImplementedError(f"source_image (DDIM inversion) supports SD and SDXL, not {run.family}")
        image = self.source_image
        if isinstance(image, str):
            from PIL import Image

            image = Image.open(image).convert("RGB")
        scheduler = pipe.pipe.scheduler
        if type(scheduler).__name__ != "DDIMScheduler":
            raise ValueError(
                f"source_image: the inverted latents follow DDIM; this pipeline samples with {type(scheduler).__name__} "
                "(set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config))"
            )
        timesteps = scheduler.timesteps
        per = max(run.layout.images // max(len(run.prompts), 1), 1)
        prompt = self.source_prompt or run.prompts[min(self.source // per, len(run.prompts) - 1)]
        size = pixel_size(run)
        res = ddim_invert(pipe, image, prompt, num_inference_steps=len(timesteps), guidance_scale=self.inversion_guidance,
                          height=size[0], width=size[1])
        if len(res.timesteps) != len(timesteps) or not torch.equal(res.timesteps.to(timesteps.device, timesteps.dtype), timesteps):
            raise ValueError(
                "source_image: the run's scheduler timesteps differ from DDIM's; use a DDIMScheduler "
                "(pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config))"
            )
        return res

    def end(self, run) -> None:
        run.store.pop(self, None)
        self._run_store = None

    # ---- start latents -------------------------------------------------------------------------
    def before_step(self, latents, state, denoise):
        """Step 0: every row starts from the source's latents (or z_T); the inverted source row is pinned."""
        st = self._run_store
        inverted = None if st is None else st.get("inverted")
        if state.index == 0 and self.same_noise and latents.shape[0] > 1:
            start = latents[self.source] if inverted is None else inverted.at_step(0)[0]
            latents = start.to(latents.device, latents.dtype).expand_as(latents).clone()
        if inverted is not None and (self.pin_source or state.index == 0):
            latents = latents.clone()
            latents[self.source] = inverted.at_step(state.index)[0].to(latents.device, latents.dtype)
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
            got = st["rows"][key] = {"src": idx.to(dev), "target": target.to(dev), "t": t.to(dev), "img": (t % layout.images).to(dev)}
        return got

    def _new_step(self, call, st) -> None:
        """At a step's first call: the measure of the previous step gives this step's weight w."""
        index = call.run.state.index if call.run.state is not None else 0
        if st["step"] == index:
            return
        st["step"] = index
        if st["count"]:
            m = st["sum"] / st["count"]
            st["w"] = ((self.pe_max - m) / (self.pe_max - self.pe_min)).clamp(0.0, 1.0)
        st["sum"], st["count"], st["rope"] = None, 0, {}

    def _cross_rope(self, call, st, w):
        """(cos, sin) of FLUX's RoPE at positions ``ids·w`` (text ids are 0: text is never rotated)."""
        key = (call.q.shape[2], call.q_image.start)
        got = st["rope"].get(key)
        if got is None:
            h, wd = call.grid
            n_txt = call.q_image.start
            ids = torch.zeros(n_txt + h * wd, 3, device=call.q.device)
            ids[n_txt:, 1] = torch.arange(h, device=call.q.device).repeat_interleave(wd).float()
            ids[n_txt:, 2] = torch.arange(wd, device=call.q.device).repeat(h).float()
            pos = call.run.store["pipeline"].denoiser.pos_embed
            cos, sin = pos(ids * w)
            got = st["rope"][key] = (cos.to(call.q.device), sin.to(call.q.device))
        return got

    def _shares(self, call) -> bool:
        return self._names is None or call.layer.name in self._names

    def qkv(self, call) -> None:
        rows = self._rows(call)
        if rows is None:
            return
        st = call.run.store[self]
        if st["modulate"]:
            self._new_step(call, st)
        if not self._shares(call):
            return  # a layer read only for SynPS's measure or MaskAuto's maps
        idx = rows["src"]
        ki = call.k_image
        if call.k_text is None and ki.start == 0 and ki.stop >= call.k.shape[2]:
            call.k, call.v = call.k[idx], call.v[idx]  # source rows map to themselves
        else:  # joint attention: the target keeps its own text keys
            k, v = call.k.clone(), call.v.clone()
            k[:, :, ki], v[:, :, ki] = call.k[idx][:, :, ki], call.v[idx][:, :, ki]
            call.k, call.v = k, v
        rope = call.extras.get("rope")
        w = st["w"]
        if st["modulate"] and rope is not None and not (isinstance(w, float) and w == 1.0):
            cos, sin = rope
            cc, sc = self._cross_rope(call, st, w)
            t = rows["t"]

            def move(x):
                return rotate(rotate(x, cos, -sin), cc, sc)

            q, k = call.q.clone(), call.k.clone()
            q[t], k[t] = move(call.q[t]), move(call.k[t])
            call.q, call.k = q, k

    # ---- MaskAuto: maps from cross-attention -----------------------------------------------------
    def needs_probs(self, call) -> bool:
        return call.layer.name in self._readers and call.run.layout.has("cond") and not torch.is_grad_enabled()

    def probs(self, call, p: torch.Tensor) -> torch.Tensor:
        """Add this layer's head-averaged maps of the chosen tokens (conditional rows) to the step's sum."""
        st = call.run.store[self]
        index = call.run.state.index if call.run.state is not None else 0
        block = p[call.run.layout.rows("cond"), :, call.q_image, call.k_text].float().mean(dim=1)  # (images, L, T)
        sel = st.get("select")
        if sel is None or sel.shape[-1] != block.shape[-1]:
            sel = torch.zeros(block.shape[0], block.shape[-1], 1)
            for img, idx in enumerate(st["tokens"]):
                if max(idx) >= block.shape[-1]:
                    raise ValueError(f"{_NAME}: mask token {max(idx)} lies beyond the {block.shape[-1]} text tokens of this model")
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
        index = call.run.state.index if call.run.state is not None else 0
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
        if self._shares(call):
            if "masks" in st:
                o = self._masked(call, o, rows, self._cells(call, st))
            elif self.mask_tokens is not None and call.k_text is None:
                cells = self._auto_cells(call, st)
                if cells is not None:
                    o = self._masked(call, o, rows, cells)
        if st["modulate"] and call.q_text is not None and call.run.layout.has("cond"):
            self._measure(call, st, o, rows["src"], rows["target"])
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

    def _measure(self, call, st, o, idx, target) -> None:
        """SynPS's editing measure on this block: cos(O_s, O_t) over image tokens / over text tokens."""
        cond = call.run.layout.rows("cond")
        t = target[cond].nonzero().flatten() + cond.start
        if t.numel() == 0:
            return
        s = idx[t]
        qi, qt = call.q_image, call.q_text
        a, b = o[s].float(), o[t].float()

        def cos(x, y):
            x, y = x.flatten(1), y.flatten(1)
            return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + 1e-8)

        ratio = cos(a[:, :, qi], b[:, :, qi]) / (cos(a[:, :, qt], b[:, :, qt]) + 1e-8)
        total = ratio.mean()
        st["sum"] = total if st["sum"] is None else st["sum"] + total
        st["count"] += 1

    def __repr__(self) -> str:
        return (f"MutualSelfAttention(source={self.source}, start_step={self.start_step}, start_layer={self.start_layer}, "
                f"layers={self._user_layers!r}, steps={self.steps!r}, same_noise={self.same_noise}, mask_tokens={self.mask_tokens!r})")


class _NoLatentHookMutual(MutualSelfAttention):
    """`MutualSelfAttention(same_noise=False)` with a generated source: no loop hook (works with `ac.attach`)."""

    before_step = Control.before_step
