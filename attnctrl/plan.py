"""Resolve each control's selector to layers and build the per-layer plan of a run (DESIGN rules 3, 4)."""

from __future__ import annotations

from collections.abc import Sequence

from .control import HOOKS, Control
from .layers import LayerInfo
from .selectors import select


class CompositionError(ValueError):
    """Two controls that cannot share a layer were put on the same one."""


_KV = frozenset({"replaces_kv", "extends_kv"})
_VALUES = frozenset({"edits_values"})
#: (effects of one control, effects of another, why they cannot share a layer): two controls on one
#: layer conflict when one has an effect of the first set and the other one of the second. Each is a
#: pair whose result depends on the controls' order in a way neither control can see.
CONFLICTS: tuple[tuple[frozenset[str], frozenset[str], str], ...] = (
    (
        _KV,
        _KV,
        "both replace or extend the layer's keys/values, so whichever runs second borrows or appends the "
        "first one's keys (the order silently decides what is shared)",
    ),
    (
        _VALUES,
        _VALUES,
        "both edit the layer's values, so the second edits values the first already rewrote",
    ),
)


#: effects on the image keys of a self-attention part: they do not apply on a layer without one (a UNet
#: cross-attention layer, planned e.g. to read maps)
SELF_PART_EFFECTS = _KV


def conflict(a: Control, b: Control, layer: LayerInfo | None = None) -> str | None:
    """Why `a` and `b` cannot share `layer` (a `CONFLICTS` rule or `exclusive_with`), or None."""
    ea, eb = a.layer_effects(), b.layer_effects()
    if layer is not None and not layer.has_part("self"):
        ea, eb = ea - SELF_PART_EFFECTS, eb - SELF_PART_EFFECTS
    for first, second, why in CONFLICTS:
        if (ea & first and eb & second) or (ea & second and eb & first):
            return why
    if b.name in a.exclusive_with or a.name in b.exclusive_with:
        return "one is declared `exclusive_with` the other"
    return None


def check_controls(controls: Sequence[Control] | Control | None) -> list[Control]:
    """Validate the `controls=` argument: a list of `Control` instances (None → empty)."""
    if controls is None:
        return []
    if isinstance(controls, Control):
        controls = [controls]
    out = list(controls)
    for c in out:
        if not isinstance(c, Control):
            raise TypeError(f"controls must be attnctrl Control instances, got {type(c).__name__}: {c!r}")
    return out


def build_plan(
    controls: Sequence[Control], layers: list[LayerInfo], grid: tuple[int, int]
) -> dict[str, list[tuple[Control, frozenset[int] | None]]]:
    """``{layer name: [(control, heads), ...]}`` in the controls' order, for controls with attention hooks.

    Raises `SelectorError` if a control's selector matches nothing, `CompositionError` if two
    controls whose effects conflict (`conflict`) land on one layer — before any step runs.
    """
    plan: dict[str, list] = {}
    infos: dict[str, LayerInfo] = {}
    for control in controls:
        if not any(control.implements(h) for h in HOOKS):
            continue
        picked = control.narrow_layers(select(layers, control.layers, grid, owner=type(control).__name__), grid)
        control.check_layers(picked)
        for layer, heads in picked:
            plan.setdefault(layer.name, []).append((control, heads))
            infos[layer.name] = layer
    for name, entries in plan.items():
        for i, (a, _) in enumerate(entries):
            for b, _ in entries[i + 1 :]:
                why = conflict(a, b, infos[name])
                if why is not None:
                    raise CompositionError(
                        f"{type(a).__name__} and {type(b).__name__} cannot share layer {name}: {why}; "
                        "give them disjoint `layers=` selectors"
                    )
    return plan
