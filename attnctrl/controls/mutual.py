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

Real images: ``source_image=`` inverts the image with `attnctrl.inversion.ddim_invert` (SD/SDXL,
DDIM scheduler) under ``source_prompt`` (default: the source row's prompt) and puts the inverted
latents in the source row, at every step by default (``pin_source``) or only at the first (as
MasaCtrl's ``latents=start_code``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..control import Control
from ..regions import check_masks, mask_cells, pixel_size
from ..selectors import SelectorLike
from .isolation import rotate

_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2, "blocks": 3, "single": 4}
#: SynPS's blocks (forward order over FLUX's 19 double + 38 single blocks)
SYNPS_BLOCKS = frozenset({0, 7, 8, 9, 10, 18, 25, 28, 37, 42, 45, 50, 56})
MASACTRL_START_LAYER = {"sd": 10, "sdxl": 44}


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
    """

    name = "mutual"
    default_layers = "self"

    def __new__(cls, *args, **kwargs):
        # a real source image needs a latent hook (the inverted latents enter the source row); the
        # generated-source control keeps none, so it also works with `ac.attach` and inference mode
        kind = _InvertedSourceMutual if cls is MutualSelfAttention and kwargs.get("source_image") is not None else cls
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
        super().__init__(layers=layers, steps=steps)
        self.source, self.start_step, self.start_layer = source, start_step, start_layer
        self._user_layers, self._user_steps = layers, steps
        self.source_mask, self.target_mask = source_mask, target_mask
        self.source_image, self.source_prompt = source_image, source_prompt
        self.inversion_guidance, self.pin_source = float(inversion_guidance), bool(pin_source)
        self.pe_modulation, self.pe_min, self.pe_max = bool(pe_modulation), float(pe_min), float(pe_max)
        self._names: frozenset[str] | None = None  # layers that share (None: every planned layer)

    # ---- where ---------------------------------------------------------------------------------
    def narrow_layers(self, picked: list, grid) -> list:
        picked = [(lay, h) for lay, h in picked if lay.has_part("self")]
        if self._user_layers is not None or not picked:
            self._names = None
            return picked
        order = forward_order([lay for lay, _ in picked])
        family = _family_of_layers(order)
        if family == "flux" and self.start_layer is None:
            chosen = [lay for i, lay in enumerate(order) if i in SYNPS_BLOCKS]
        else:
            start = self.start_layer
            if start is None:
                start = MASACTRL_START_LAYER.get(family, len(order) // 2)
            if start >= len(order):
                raise ValueError(
                    f"{type(self).__name__}: start_layer={start} but this model has {len(order)} self-attention layers "
                    f"(counted from 0 in forward order); give a smaller start_layer or layers="
                )
            chosen = order[start:]
        if not chosen:
            raise ValueError(f"{type(self).__name__}: no layer of SynPS's block set exists in this model; give start_layer or layers=")
        self._names = frozenset(lay.name for lay in chosen)
        if family == "flux" and self.pe_modulation:
            return picked  # SynPS's measure reads every block
        return [(lay, h) for lay, h in picked if lay.name in self._names]

    def check_layers(self, picked) -> None:
        if not picked:
            raise ValueError(f"{type(self).__name__} shares self-attention; the selector picks no self-attention layer")

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        n = run.layout.images
        if self.source >= n:
            raise ValueError(f"{type(self).__name__}: source={self.source} is outside the batch of {n} image(s) (indices 0..{n - 1})")
        flux = run.family == "flux"
        if self._user_steps is None:
            start = self.start_step if self.start_step is not None else (0 if flux else 4)
            self.steps = (start, 1.0)
        st: dict[str, Any] = {"rows": {}, "w": 1.0, "sum": None, "count": 0, "step": -1, "rope": {}, "cells": {}}
        if self.source_mask is not None:
            sizes = [s for s in (pixel_size(run), tuple(run.grid)) if s is not None]
            st["masks"] = (check_masks(self.source_mask, 1, sizes, "source_mask"), check_masks(self.target_mask, 1, sizes, "target_mask"))
        st["modulate"] = flux and self.pe_modulation and run.store.get("pipeline") is not None
        if self.source_image is not None:
            st["inverted"] = self._invert(run)
        run.store[self] = st

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

    # ---- attention -----------------------------------------------------------------------------
    def _rows(self, call) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(row → its branch's source row index, bool target rows), or None with one image."""
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
            got = st["rows"][key] = (idx.to(call.q.device), (idx != torch.arange(layout.size)).to(call.q.device))
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

    def qkv(self, call) -> None:
        rows = self._rows(call)
        if rows is None:
            return
        st = call.run.store[self]
        if st["modulate"]:
            self._new_step(call, st)
        if self._names is not None and call.layer.name not in self._names:
            return  # a layer read only for SynPS's measure
        idx, target = rows
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
            t = target.nonzero().flatten()

            def move(x):
                return rotate(rotate(x, cos, -sin), cc, sc)

            q, k = call.q.clone(), call.k.clone()
            q[t], k[t] = move(call.q[t]), move(call.k[t])
            call.q, call.k = q, k

    def _cells(self, call, st):
        key = call.grid
        got = st["cells"].get(key)
        if got is None:
            ms, mt = st["masks"]
            s = mask_cells(ms, call.grid, exclusive=False)[0].flatten()
            t = mask_cells(mt, call.grid, exclusive=False)[0].flatten().float()
            got = st["cells"][key] = (s.to(call.q.device), t.to(call.q.device))
        return got

    def out(self, call, o: torch.Tensor) -> torch.Tensor:
        rows = self._rows(call)
        if rows is None:
            return o
        st = call.run.store[self]
        idx, target = rows
        shares = self._names is None or call.layer.name in self._names
        if shares and "masks" in st:
            o = self._masked(call, st, o, target)
        if st["modulate"] and call.q_text is not None and call.run.layout.has("cond"):
            self._measure(call, st, o, idx, target)
        return o

    def _masked(self, call, st, o, target):
        """MasaCtrl's mask-guided variant on the target rows (keys are already the source's)."""
        src, tgt = self._cells(call, st)
        if not bool(src.any()) or bool(src.all()):
            return o
        t = target.nonzero().flatten()
        q, k, v = call.q[t], call.k[t], call.v[t]
        ki, qi = call.k_image, call.q_image
        fg = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bg = torch.zeros_like(fg)
        fg[ki] = torch.where(src, 0.0, float("-inf")).to(q.dtype)
        bg[ki] = torch.where(src, float("-inf"), 0.0).to(q.dtype)
        o_fg = F.scaled_dot_product_attention(q, k, v, attn_mask=fg.view(1, 1, 1, -1), scale=call.scale)
        o_bg = F.scaled_dot_product_attention(q, k, v, attn_mask=bg.view(1, 1, 1, -1), scale=call.scale)
        m = tgt.view(1, 1, -1, 1).to(o.dtype)
        o = o.clone()
        o[t, :, qi] = m * o_fg[:, :, qi] + (1 - m) * o_bg[:, :, qi]
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
        return f"MutualSelfAttention(source={self.source}, start_step={self.start_step}, start_layer={self.start_layer}, layers={self._user_layers!r}, steps={self.steps!r})"


class _InvertedSourceMutual(MutualSelfAttention):
    """`MutualSelfAttention` with ``source_image=``: puts the inverted latents in the source row."""

    _run_store: dict | None = None

    def begin(self, run) -> None:
        super().begin(run)
        self._run_store = run.store[self]  # the loop's latent hook gets no run

    def before_step(self, latents, state, denoise):
        st = self._run_store
        if st is None or not (self.pin_source or state.index == 0):
            return latents
        z = st["inverted"].at_step(state.index).to(latents.device, latents.dtype)
        latents = latents.clone()
        latents[self.source] = z[0]
        return latents

    def end(self, run) -> None:
        super().end(run)
        self._run_store = None
