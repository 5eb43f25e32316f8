"""SynPS: the positional weighting of mutual attention on FLUX (`MutualSelfAttention`'s FLUX default).

SynPS (Chen et al., "The Devil is in Attention Sharing", arXiv 2512.14423, reference code
zhuochen02/SynPS): in 13 of the 57 blocks (double 0, 7, 8, 9, 10, 18; single 6, 9, 18, 23, 26, 31, 37
counted from 19 on) the target attends to ``[its own text; the source's image]`` keys/values, with
target queries and those keys rotated by RoPE at positions scaled by a weight w (``ids·w``; w = 0
drops positional cues, w = 1 keeps them). The *editing measure* after each step is the mean over all
blocks of ``cos(O_s^img, O_t^img) / cos(O_s^txt, O_t^txt)`` (attention outputs of source and target),
and the next step uses ``w = clip((τ_max − m) / (τ_max − τ_min), 0, 1)`` (τ_min = 0.9, τ_max = 1.0;
w = 1 at the first step). SynPS shares from the first step.

`SynPS` is configuration (τ_min, τ_max). What one run needs — the measure so far, the weight, the
RoPE tables at the scaled positions — lives in the dict its methods are given: the control's
``run.store[control]``, which `SynPS.fresh` starts.
"""

from __future__ import annotations

import torch

from ..rope import rerotate

#: SynPS's blocks (forward order over FLUX's 19 double + 38 single blocks)
SYNPS_BLOCKS = frozenset({0, 7, 8, 9, 10, 18, 25, 28, 37, 42, 45, 50, 56})

__all__ = ["SYNPS_BLOCKS", "SynPS", "synps_layers"]


def synps_layers(order: list) -> list:
    """The layers of SynPS's block set among `order` (the self-attention layers in forward order)."""
    return [lay for i, lay in enumerate(order) if i in SYNPS_BLOCKS]


class SynPS:
    """SynPS's weight schedule, scaled positions and editing measure, with thresholds τ_min < τ_max."""

    def __init__(self, pe_min: float = 0.9, pe_max: float = 1.0):
        self.pe_min, self.pe_max = float(pe_min), float(pe_max)

    @staticmethod
    def fresh() -> dict:
        """A run's starting state: w = 1 (the first step), no measure yet."""
        return {"w": 1.0, "sum": None, "count": 0, "step": -1, "rope": {}}

    def new_step(self, st: dict, index: int) -> None:
        """At step `index`'s first call: the previous step's mean measure m gives this step's
        ``w = clip((τ_max − m) / (τ_max − τ_min), 0, 1)``; the measure restarts."""
        if st["step"] == index:
            return
        st["step"] = index
        if st["count"]:
            m = st["sum"] / st["count"]
            st["w"] = ((self.pe_max - m) / (self.pe_max - self.pe_min)).clamp(0.0, 1.0)
        st["sum"], st["count"], st["rope"] = None, 0, {}

    def reposition(self, call, st: dict, rows: torch.Tensor) -> None:
        """Queries and keys of target `rows` moved from RoPE at the positions ``ids`` to ``ids·w``
        (nothing at w = 1, or on a layer without RoPE)."""
        rope, w = call.extras.get("rope"), st["w"]
        if rope is None or (isinstance(w, float) and w == 1.0):
            return
        scaled = self._scaled_rope(call, st, w)
        q, k = call.q.clone(), call.k.clone()
        q[rows], k[rows] = rerotate(call.q[rows], rope, scaled), rerotate(call.k[rows], rope, scaled)
        call.q, call.k = q, k

    def _scaled_rope(self, call, st: dict, w) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of FLUX's RoPE (the run's ``denoiser.pos_embed``) at positions ``ids·w`` (text ids
        are 0: text is never rotated); once per step and layer shape."""
        key = (call.q.shape[2], call.q_image.start)
        got = st["rope"].get(key)
        if got is None:
            h, wd = call.grid
            n_txt = call.q_image.start
            ids = torch.zeros(n_txt + h * wd, 3, device=call.q.device)
            ids[n_txt:, 1] = torch.arange(h, device=call.q.device).repeat_interleave(wd).float()
            ids[n_txt:, 2] = torch.arange(wd, device=call.q.device).repeat(h).float()
            cos, sin = call.run.denoiser.pos_embed(ids * w)
            got = st["rope"][key] = (cos.to(call.q.device), sin.to(call.q.device))
        return got

    def measure(self, call, st: dict, o: torch.Tensor, src: torch.Tensor, target: torch.Tensor) -> None:
        """Add this block's editing measure ``cos(O_s, O_t)`` over image tokens / over text tokens
        (conditional rows; `src`: each row's source row, `target`: bool target rows) to the step's sum."""
        cond = call.run.layout.rows("cond")
        t = target[cond].nonzero().flatten() + cond.start
        if t.numel() == 0:
            return
        s = src[t]
        qi, qt = call.q_image, call.q_text
        a, b = o[s].float(), o[t].float()

        def cos(x, y):
            x, y = x.flatten(1), y.flatten(1)
            return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + 1e-8)

        ratio = cos(a[:, :, qi], b[:, :, qi]) / (cos(a[:, :, qt], b[:, :, qt]) + 1e-8)
        total = ratio.mean()
        st["sum"] = total if st["sum"] is None else st["sum"] + total
        st["count"] += 1
