"""Attention-perturbation guidance: `HeadPerturbation` (SoftPAG, per head) and `PAG`.

PAG (Ahn et al., ECCV 2024, Eq. 9-11): a perturbed branch whose self-attention map is replaced by
the identity, and guidance ``ε = ε_u + w(ε_c − ε_u) + s(ε_c − ε_ptb)`` (``ε_c + s(ε_c − ε_ptb)``
without CFG), with the adaptive scale ``s(t) = max(0, s − s_a·(1000 − t))`` of diffusers' PAG.

HeadHunter / SoftPAG ("Fine-Grained Perturbation Guidance via Attention Head Selection", 2025,
Eq. 5): perturb only selected heads, softly: ``A' = (1 − u)·A + u·I``. Since ``I·V = V`` the
perturbed output is ``(1 − u)·SDPA(q, k, v) + u·v`` per head — no probability matrix is formed.
``kind="uniform"`` uses ``A' = (1 − u)·A + u·U`` with ``U`` uniform over the keys (``U·V`` = mean of V).

SD3/FLUX joint attention: the image→image block is perturbed, as diffusers' SD3 PAG does — the
perturbed image queries attend to themselves among the image tokens and to the text tokens as
before (an additive mask on that branch); text queries are unchanged.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import torch.nn.functional as F

from ..control import Control
from ..params import Range
from ..selectors import Selector, SelectorLike

HeadSpec = Union[str, Path, SelectorLike, Sequence[tuple], dict]
Kind = Literal["identity", "uniform"]
KINDS: tuple[str, ...] = typing.get_args(Kind)


def head_selectors(heads: HeadSpec) -> list[str]:
    """Normalise a head specification to selector strings.

    Accepts selector strings (``"mid,heads=0|1"``: their self-attention layers), ``(layer name, head)`` pairs, a dict
    ``{layer name: [heads]}``, or the path of a JSON file holding either of the last two
    (as written by ``attnctrl heads search``: ``{"heads": [[layer, head], ...]}``).
    """
    spec: Any = heads
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".json")):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"head file {str(path)!r} does not exist")
        data = json.loads(path.read_text())
        spec = data.get("heads", data) if isinstance(data, dict) else data
        if isinstance(spec, list):
            spec = [tuple(h) for h in spec]
    if isinstance(spec, (str, Selector)):
        spec = [spec]
    if isinstance(spec, dict):
        spec = [(layer, h) for layer, hs in spec.items() for h in ([hs] if isinstance(hs, int) else hs)]
    items = list(spec)
    if not items:
        raise ValueError("no heads given to perturb")
    if all(isinstance(h, str) for h in items):  # selectors: only their self-attention layers
        return [f"{h},self" for h in items]
    grouped: dict[str, set[int]] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int)):
            raise ValueError(f"expected (layer name, head index) pairs, got {item!r}")
        if item[1] < 0:
            raise ValueError(f"head index must be >= 0, got {item!r}")
        grouped.setdefault(item[0], set()).add(item[1])
    return [f"name={layer},heads={'|'.join(map(str, sorted(hs)))}" for layer, hs in grouped.items()]


class HeadPerturbation(Control):
    """Soft perturbed-attention guidance on selected self-attention heads (HeadHunter / SoftPAG).

    Args:
        heads: which heads: selectors with ``heads=``, (layer, head) pairs, a dict, or a JSON file.
        scale: guidance scale s (≥ 0).
        softness: u in [0, 1]: 0 leaves the heads alone, 1 replaces their map by I (or U).
        kind: "identity" (A → I) or "uniform" (A → U).
        adaptive_scale: s_a, giving s(t) = max(0, s − s_a·(1000 − t)).
        steps: (start, stop) steps where guidance applies (ints or fractions).
    """

    name = "heads"
    default_layers = "self"

    def __init__(
        self,
        heads: HeadSpec,
        scale: Annotated[float, Range(0)] = 3.0,
        softness: Annotated[float, Range(0, 1)] = 1.0,
        kind: Kind = "identity",
        adaptive_scale: Annotated[float, Range(0)] = 0.0,
        steps=None,
    ):
        super().__init__(layers=head_selectors(heads), steps=steps)
        self.scale, self.softness, self.kind, self.adaptive_scale = (
            float(scale),
            float(softness),
            kind,
            float(adaptive_scale),
        )

    # ---- where ---------------------------------------------------------------------------------
    def check_layers(self, picked) -> None:
        bad = [layer.name for layer, _ in picked if not layer.has_part("self")]
        if bad:
            raise ValueError(f"{type(self).__name__} perturbs self-attention; not self-attention: {', '.join(bad)}")

    def branches(self, run):
        return ("perturbed",) if self.scale > 0 else ()

    # ---- attention -----------------------------------------------------------------------------
    def _weights(self, call, o: torch.Tensor) -> torch.Tensor:
        """u per head, shaped (1, H, 1, 1): `softness` on the selected heads, 0 elsewhere."""
        u = torch.zeros(o.shape[1], dtype=o.dtype, device=o.device)
        u[sorted(call.heads) if call.heads is not None else slice(None)] = self.softness
        return u.view(1, -1, 1, 1)

    def _perturbed(self, call, rows: slice) -> torch.Tensor:
        """The fully perturbed output (u = 1) of the perturbed rows, without explicit probabilities."""
        # only the layer's own keys: keys appended by another control (e.g. SharedAttention) come after them
        own = max(s.stop for s in (call.k_image, call.k_text) if s is not None)
        q, k, v = call.q[rows], call.k[rows, :, :own], call.v[rows, :, :own]
        if self.kind == "uniform":
            return v.mean(dim=2, keepdim=True).expand(-1, -1, q.shape[2], -1)
        if call.k_text is None:  # pure self-attention: I·V = V
            return v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_identity_mask(call, q))

    def replaced_rows(self, call) -> slice | None:
        """With u = 1 on every head, the perturbed rows' attention is never needed: skip it."""
        if self.softness == 1.0 and call.heads is None and call.run.layout.has("perturbed"):
            return call.run.layout.rows("perturbed")
        return None

    def out(self, call, o: torch.Tensor) -> torch.Tensor:
        layout = call.run.layout
        if not layout.has("perturbed") or self.softness == 0.0:
            return o
        rows = layout.rows("perturbed")
        perturbed = self._perturbed(call, rows)
        if torch.is_grad_enabled():
            o = o.clone()  # keep autograd's saved tensors intact; otherwise edit the fresh output in place
        if self.replaced_rows(call) is not None:
            o[rows] = perturbed
        else:
            u = self._weights(call, o)
            o[rows] = (1 - u) * o[rows] + u * perturbed
        return o

    # ---- guidance ------------------------------------------------------------------------------
    def scale_at(self, timestep: float) -> float:
        """s(t) = max(0, s − s_a·(1000 − t)) (diffusers' `pag_adaptive_scale`)."""
        if self.adaptive_scale == 0.0:
            return self.scale
        return max(0.0, self.scale - self.adaptive_scale * (1000 - timestep))

    def combine(self, run, preds, guided):
        state = run.state
        if "perturbed" not in preds or not self.active(state):
            return guided
        return guided + self.scale_at(state.timestep) * (preds["cond"] - preds["perturbed"])


def _identity_mask(call, q: torch.Tensor) -> torch.Tensor:
    """Additive mask for joint attention: image queries see only themselves among image keys."""
    key = ("identity-mask", q.shape[2], call.q_image.start, call.q_image.stop, q.dtype, q.device)
    store = call.run.store
    mask = store.get(key)
    if mask is None:
        n = q.shape[2]
        img = call.q_image
        mask = torch.zeros(n, n, dtype=q.dtype, device=q.device)
        mask[img, img] = float("-inf")
        mask[img, img].fill_diagonal_(0)
        store[key] = mask
    return mask


class PAG(HeadPerturbation):
    """Perturbed-Attention Guidance (Ahn et al. 2024): every head of the chosen self-attention layers, u = 1.

    Args:
        layers: module paths as in diffusers' ``pag_applied_layers`` (``"mid"``, ``"up_blocks.1"``,
            ``"down_blocks.2.attentions.0"``, ``"transformer_blocks.7"``), matched on whole dotted
            segments (``blocks.1`` never selects ``blocks.10``); self-attention layers only.
        scale: s. adaptive_scale: s_a. steps: step range.
        match: ``"segments"`` (default) as above; ``"diffusers"`` reads each path as diffusers'
            ``pag_applied_layers`` does (``re.search``: on SD3, ``"blocks.1"`` is blocks 1 and 10–19),
            to reproduce numbers made with diffusers' PAG pipelines.
    """

    name = "pag"

    def __init__(
        self,
        layers: SelectorLike = "mid",
        scale: Annotated[float, Range(0)] = 3.0,
        adaptive_scale: Annotated[float, Range(0)] = 0.0,
        steps=None,
        match: Literal["segments", "diffusers"] = "segments",
    ):
        items = [layers] if isinstance(layers, (str, Selector)) else list(layers)
        if match == "diffusers":
            if not all(isinstance(item, str) for item in items):
                raise ValueError("match='diffusers' takes layer paths as strings, as pag_applied_layers does")
            items = [f"search={item}" for item in items]
        self.match = match
        super().__init__(items, scale=scale, softness=1.0, adaptive_scale=adaptive_scale, steps=steps)
