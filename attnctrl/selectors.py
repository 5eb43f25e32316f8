"""Exact layer selectors.

A selector string is a comma-separated list of terms that must all hold (AND); a list of
selectors matches any of them (OR). Terms:

===================  =========================================================================
``self`` ``cross``   layer kind; joint (SD3/FLUX) layers have both parts and match both.
``joint``            only joint layers.
``down`` ``mid``     place in a UNet; ``blocks`` / ``single`` for SD3/FLUX double/single blocks.
``up``
``res=16``           token-grid height at this run's size (``res=16|32`` for several).
``block=1``          block index within its place (``block=0|2``).
``name=PATH``        exactly this layer name.
``re=REGEX``         regex matched against the whole name (``re.fullmatch``: anchored).
``search=REGEX``     diffusers' ``pag_applied_layers`` rule, for reproducing its numbers: ``re.search``
                     anywhere in the name, so ``search=blocks.1`` also picks ``blocks.10``–``blocks.19``
                     (diffusers' "fake integral match" exclusion is kept; it never fires on a layer name).
``heads=0|3``        restrict to these heads (otherwise all heads).
``up_blocks.1``      any other word: a module path matched on whole dotted segments, so
                     ``blocks.1`` never matches ``blocks.10`` nor ``transformer_blocks.1``.
===================  =========================================================================

Examples: ``"cross,res=16"``, ``"self,up,heads=0|1"``, ``"mid"``, ``"down_blocks.2.attentions.0"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from .layers import LayerInfo

PLACES = ("down", "mid", "up", "blocks", "single")


class SelectorError(ValueError):
    """A selector that cannot be parsed, or that matches no layer."""


def _ints(value: str, term: str) -> frozenset[int]:
    try:
        return frozenset(int(x) for x in value.split("|") if x != "")
    except ValueError:
        raise SelectorError(f"selector term {term!r}: expected integers separated by '|'") from None


def _segment_match(path: tuple[str, ...], name: tuple[str, ...]) -> bool:
    n = len(path)
    return any(name[i : i + n] == path for i in range(len(name) - n + 1))


def _diffusers_search(pattern: re.Pattern, name: str) -> bool:
    """diffusers' `PAGMixin` layer rule: `re.search`, unless both last segments are the same number."""
    last_id, last_name = pattern.pattern.split(".")[-1], name.split(".")[-1]
    fake_integral = last_id.isnumeric() and last_name.isnumeric() and last_id == last_name
    return pattern.search(name) is not None and not fake_integral


@dataclass(frozen=True)
class Selector:
    """A parsed selector: every set field must hold. Build with `Selector.parse`."""

    text: str
    kinds: frozenset[str] = frozenset()
    places: frozenset[str] = frozenset()
    res: frozenset[int] = frozenset()
    blocks: frozenset[int] = frozenset()
    names: frozenset[str] = frozenset()
    regexes: tuple[re.Pattern, ...] = ()
    searches: tuple[re.Pattern, ...] = ()
    paths: tuple[tuple[str, ...], ...] = ()
    heads: frozenset[int] | None = None

    @classmethod
    def parse(cls, text: str) -> Selector:
        if not isinstance(text, str) or not text.strip():
            raise SelectorError(f"empty layer selector {text!r}")
        kw: dict = {"kinds": set(), "places": set(), "res": set(), "blocks": set(), "names": set()}
        regexes: list[re.Pattern] = []
        searches: list[re.Pattern] = []
        paths: list[tuple[str, ...]] = []
        heads: frozenset[int] | None = None
        for term in (t.strip() for t in text.split(",")):
            if not term:
                raise SelectorError(f"empty term in selector {text!r}")
            key, eq, value = term.partition("=")
            if eq:
                if key == "res":
                    kw["res"] |= _ints(value, term)
                elif key == "block":
                    kw["blocks"] |= _ints(value, term)
                elif key == "heads":
                    heads = _ints(value, term)
                elif key == "name":
                    kw["names"].add(value)
                elif key in ("re", "regex", "search"):
                    try:
                        (searches if key == "search" else regexes).append(re.compile(value))
                    except re.error as e:
                        raise SelectorError(f"selector term {term!r}: bad regex ({e})") from None
                else:
                    raise SelectorError(
                        f"unknown selector key {key!r} in {text!r}; keys: res, block, heads, name, re, search"
                    )
            elif term in ("self", "cross", "joint"):
                kw["kinds"].add(term)
            elif term in PLACES:
                kw["places"].add(term)
            elif re.fullmatch(r"[A-Za-z_][\w]*(\.\w+)*", term):
                paths.append(tuple(term.split(".")))
            else:
                raise SelectorError(f"cannot read selector term {term!r} in {text!r}")
        return cls(
            text=text,
            kinds=frozenset(kw["kinds"]),
            places=frozenset(kw["places"]),
            res=frozenset(kw["res"]),
            blocks=frozenset(kw["blocks"]),
            names=frozenset(kw["names"]),
            regexes=tuple(regexes),
            searches=tuple(searches),
            paths=tuple(paths),
            heads=heads,
        )

    def matches(self, layer: LayerInfo, input_grid: tuple[int, int] | None = None) -> bool:
        if self.kinds and not any(
            (k == "joint" and layer.kind == "joint") or (k != "joint" and layer.has_part(k)) for k in self.kinds
        ):
            return False
        if self.places and layer.place not in self.places:
            return False
        if self.blocks and layer.block not in self.blocks:
            return False
        if self.names and layer.name not in self.names:
            return False
        if any(not r.fullmatch(layer.name) for r in self.regexes):
            return False
        if any(not _diffusers_search(r, layer.name) for r in self.searches):
            return False
        if any(not _segment_match(p, layer.segments) for p in self.paths):
            return False
        if self.res:
            if input_grid is None:
                raise SelectorError(f"selector {self.text!r} uses res= but no image size is known")
            if layer.resolution(input_grid) not in self.res:
                return False
        return True


SelectorLike = Union[str, Selector, Sequence[Union[str, Selector]]]


def as_selectors(spec: SelectorLike) -> list[Selector]:
    """Normalise a selector string, `Selector` or list of them (OR) to a list of `Selector`."""
    if isinstance(spec, (str, Selector)):
        spec = [spec]
    out = [s if isinstance(s, Selector) else Selector.parse(s) for s in spec]
    if not out:
        raise SelectorError("empty list of layer selectors")
    return out


def select(
    layers: Iterable[LayerInfo], spec: SelectorLike, input_grid: tuple[int, int] | None = None, *, owner: str = ""
) -> list[tuple[LayerInfo, frozenset[int] | None]]:
    """Layers matched by `spec`, in model order, each with its head restriction (None = all heads).

    Raises `SelectorError` naming the selector if nothing matches, or a head index is out of range.
    """
    selectors = as_selectors(spec)
    layers = list(layers)
    picked: dict[str, tuple[LayerInfo, frozenset[int] | None]] = {}
    for layer in layers:
        for sel in selectors:
            if not sel.matches(layer, input_grid):
                continue
            heads = sel.heads
            if heads is not None and max(heads) >= layer.heads:
                raise SelectorError(
                    f"selector {sel.text!r} asks for heads {sorted(heads)} but {layer.name} has {layer.heads} heads"
                )
            prev = picked.get(layer.name)
            if prev is None:
                picked[layer.name] = (layer, heads)
            elif prev[1] is not None:  # union of head restrictions; None (all heads) wins
                picked[layer.name] = (layer, None if heads is None else prev[1] | heads)
    if not picked:
        who = f"{owner}: " if owner else ""
        texts = " | ".join(repr(s.text) for s in selectors)
        size = f" at token grid {input_grid[0]}x{input_grid[1]}" if input_grid else ""
        raise SelectorError(f"{who}layer selector {texts} matches no attention layer of this model{size}")
    return list(picked.values())
