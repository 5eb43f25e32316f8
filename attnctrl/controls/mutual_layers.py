"""Which layers `MutualSelfAttention` shares at (MasaCtrl, Cao et al., ICCV 2023; SynPS's blocks on FLUX)."""

from __future__ import annotations

from ..layers import forward_order, list_layers
from .mutual_masks import _NAME, MASK_FACTOR
from .synps import synps_layers

MASACTRL_START_LAYER = {"sd": 10, "sdxl": 44}


def family_of_layers(layers: list) -> str:
    places = {lay.place for lay in layers}
    if places & {"down", "mid", "up"}:
        # SDXL's first down block has no attention: its first self-attention runs at 1/2 resolution
        first = min((lay.factor for lay in layers if lay.place == "down"), default=1)
        return "sdxl" if first >= 2 else "sd"
    return "flux" if "single" in places else "sd3"


def narrow(ctrl, picked: list, grid) -> list:
    """`MutualSelfAttention.narrow_layers`: the sharing self-attention layers and the cross-attention read for maps."""
    reads = ctrl.mask_tokens is not None
    cross = [(lay, h) for lay, h in picked if reads and lay.kind == "cross" and lay.factor == MASK_FACTOR]
    picked = [(lay, h) for lay, h in picked if lay.has_part("self")]
    if not picked:
        return picked
    order = forward_order([lay for lay, _ in picked])
    family = family_of_layers(order)
    if reads and family not in ("sd", "sdxl"):
        raise NotImplementedError(
            f"{_NAME}: mask_tokens (MasaCtrl's automatic masks) supports SD and SDXL UNets, not {family}"
        )
    if reads and not cross:
        raise ValueError(
            f"{_NAME}: mask_tokens reads cross-attention at 1/{MASK_FACTOR} of the token grid (MasaCtrl's 16x16 at "
            "512 px); this model has no cross-attention layer there"
        )
    if ctrl._user_layers is not None:
        return picked + cross
    chosen = {lay.name for lay in sharing_layers(ctrl, order, family)}
    if family == "flux" and ctrl.pe_modulation:
        return picked  # SynPS's measure reads every block; `shares_here` picks the sharing ones
    return [(lay, h) for lay, h in picked if lay.name in chosen] + cross


def sharing_layers(ctrl, order: list, family: str) -> list:
    """The layers that share among `order` (self-attention layers in forward order) without `layers=`:
    SynPS's blocks on FLUX, else from `start_layer` on (default 10 on SD, 44 on SDXL, the second half)."""
    if family == "flux" and ctrl.start_layer is None:
        chosen = synps_layers(order)
    else:
        start = ctrl.start_layer
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
    return chosen


def shares_here(ctrl, call, st) -> bool:
    """Whether this layer reads the source's keys: not a cross-attention layer read for MaskAuto's maps
    and, where SynPS's measure reads every FLUX block, one of the sharing blocks."""
    if call.layer.kind == "cross":
        return False
    run = call.run
    if ctrl._user_layers is not None or not ctrl.pe_modulation or run.family != "flux":
        return True  # the plan holds just the sharing layers (and the maps' cross-attention)
    got = st.get("sharing")
    if got is None or got[0] is not run.plan:  # once per plan (ac.attach plans again for a new grid)
        mine = {name for name, entries in run.plan.items() if any(c is ctrl for c, _ in entries)}
        order = forward_order([lay for lay in list_layers(run.denoiser) if lay.name in mine and lay.has_part("self")])
        got = st["sharing"] = (run.plan, frozenset(lay.name for lay in sharing_layers(ctrl, order, "flux")))
    return call.layer.name in got[1]
