"""Resolve each control's selector to layers and build the per-layer plan of a run (DESIGN rules 3, 4)."""

from __future__ import annotations

from collections.abc import Sequence

from .control import HOOKS, Control
from .layers import LayerInfo
from .selectors import select


class CompositionError(ValueError):
    """Two controls that cannot share a layer were put on the same one."""


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
    mutually exclusive controls land on one layer.
    """
    plan: dict[str, list] = {}
    for control in controls:
        if not any(control.implements(h) for h in HOOKS):
            continue
        picked = control.narrow_layers(select(layers, control.layers, grid, owner=type(control).__name__), grid)
        control.check_layers(picked)
        for layer, heads in picked:
            plan.setdefault(layer.name, []).append((control, heads))
    for name, entries in plan.items():
        names = [c.name for c, _ in entries]
        for c, _ in entries:
            clash = [n for n in names if n in c.exclusive_with]
            if clash:
                raise CompositionError(
                    f"{type(c).__name__} cannot share layer {name} with {', '.join(clash)}; "
                    "give them disjoint `layers=` selectors"
                )
    return plan
