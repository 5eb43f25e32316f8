"""Which layers `IsolationReposition` acts on and shares at (IR-Diffusion, He et al., arXiv 2411.19261, 2024)."""

from __future__ import annotations

from dataclasses import replace

from ..attention import active_chain
from ..layers import forward_order, list_layers

#: IR-Diffusion's sharing start on SDXL: self-attention layer 36 of 70 in forward order (reference code
#: ``pipe_test.py``: ``start_layer=36`` on playground-v2.5), i.e. the up blocks without the first two
#: transformer blocks of ``up_blocks.0``
SDXL_START_LAYER = 36
#: hooks of another control on the same layer that make this one share the layer's single SDPA call
_SHARING_HOOKS = ("bias", "out", "replaced_rows", "observe", "probs")


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


def grid_free(sels):
    return [replace(s, res=frozenset()) for s in sels]


def matches(ctrl, layer, grid=None) -> bool:
    """A self-attention layer of the user's selector (isolation, sharing)."""
    sels = ctrl._apply if grid is not None else grid_free(ctrl._apply)
    return layer.has_part("self") and any(s.matches(layer, grid) for s in sels)


def mutual_matches(ctrl, layer, grid=None) -> bool:
    """A UNet cross-attention layer of the user's selector (mutual cross-attention)."""
    sels = ctrl._cross if grid is not None else grid_free(ctrl._cross)
    return ctrl._mutual and layer.kind == "cross" and any(s.matches(layer, grid) for s in sels)


def sharing(ctrl, layers: list) -> frozenset[str] | None:
    """Names of the self-attention layers among `layers` that share (from `start_layer` on, in forward
    order); None without references."""
    if ctrl.references is None:
        return None
    order = forward_order([lay for lay in layers if matches(ctrl, lay)])
    start = default_start_layer(order) if ctrl.start_layer is None else ctrl.start_layer
    if ctrl.start_layer is not None and start >= len(order):
        raise ValueError(
            f"{type(ctrl).__name__}: start_layer={start} but the selected layers have {len(order)} self-attention "
            "layers (counted from 0 in forward order); give a smaller start_layer"
        )
    return frozenset(lay.name for lay in order[start:])


def shares_layer(ctrl, run, layer) -> bool:
    """Whether self-attention `layer` shares reference tokens: from `start_layer` on among the layers this
    control got in the run's plan (their `LayerInfo`s from the run's denoiser; once per plan)."""
    if ctrl.references is None:
        return False
    st = run.store[ctrl]
    got = st["share"]
    if got is None or got[0] is not run.plan:  # ac.attach plans again for a new grid
        mine = {name for name, entries in run.plan.items() if any(c is ctrl for c, _ in entries)}
        got = st["share"] = (
            run.plan,
            sharing(ctrl, [lay for lay in list_layers(run.denoiser) if lay.name in mine]),
        )
    return layer.name in got[1]


def alone(ctrl, call) -> bool:
    """No other active control on this layer adds a mask, edits outputs or reads probabilities."""
    return not any(
        c is not ctrl and c.implements(h) for c, _ in active_chain(call.run, call.layer.name) for h in _SHARING_HOOKS
    )
