"""What a control's parameters are, declared once on its constructor, and checked in one place.

A control declares each parameter in its ``__init__`` signature: the type (the annotation), the
default, and, in ``typing.Annotated``, what the type alone does not say::

    def __init__(self, tokens: Annotated[list[str] | None, WORDS] = None,
                 softness: Annotated[float, Range(0, 1)] = 1.0, ...)

- `Range`: the numbers a parameter (or each number of a list/tuple parameter) may take;
- `Words`: the parameter takes words of the prompt, and how several are written (``","``
  between words, ``";"`` between groups, ``" "`` into one phrase).

`Control` checks every argument against its declaration (`check_arguments`) before the
constructor body runs: ranges, ``Literal`` choices, and that numbers are numbers. Checks that
relate several parameters stay in the constructor. The command line's parser
(`attnctrl.controls.registry`), the app's panels and `Control.__repr__` read the same
declarations (`declared`), so a range or a word parameter is written in one place.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["Range", "Words", "WORDS", "GROUPS", "PHRASE", "Declared", "declared", "check_arguments", "validating"]


@dataclass(frozen=True)
class Range:
    """Numbers from `lo` to `hi` (None: unbounded); `lo_open` / `hi_open` exclude the bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def bounded(self) -> bool:
        return self.lo is not None and self.hi is not None

    def contains(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x < self.lo or (self.lo_open and x == self.lo)):
            return False
        return not (self.hi is not None and (x > self.hi or (self.hi_open and x == self.hi)))

    def describe(self) -> str:
        """``in [0, 1]``, ``in (0, 1)``, ``>= 0``, ``> 0`` or ``<= 1``."""
        fmt = lambda v: f"{v:g}"
        if self.bounded:
            return f"in {'(' if self.lo_open else '['}{fmt(self.lo)}, {fmt(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {fmt(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {fmt(self.hi)}"
        return "finite"


@dataclass(frozen=True)
class Words:
    """The parameter takes words of the prompt; `joiner` writes several picked words into it."""

    joiner: str = ","


#: a list of prompt words (``tokens=car,sheep``)
WORDS = Words(",")
#: groups of prompt words, ``;`` between groups (``groups=green glasses;yellow clock``)
GROUPS = Words(";")
#: one phrase of the prompt (picked words joined by spaces)
PHRASE = Words(" ")


@dataclass(frozen=True)
class Declared:
    """One constructor parameter's declaration beyond its plain type."""

    name: str
    range: Range | None = None
    words: Words | None = None
    choices: tuple | None = None
    number: str | None = None  # "int", "float" or "bool" when the plain type is one (optionally None)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        opts = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(opts) == 1:
            return opts[0], len(opts) < len(typing.get_args(tp))
    return tp, False


def _declare(name: str, tp: Any) -> Declared:
    rng = words = None
    if typing.get_origin(tp) is typing.Annotated:
        base, *meta = typing.get_args(tp)
        rng = next((m for m in meta if isinstance(m, Range)), None)
        words = next((m for m in meta if isinstance(m, Words)), None)
    else:
        base = tp
    plain, _ = _strip_optional(base)
    choices = typing.get_args(plain) if typing.get_origin(plain) is Literal else None
    number = {int: "int", float: "float", bool: "bool"}.get(plain) if isinstance(plain, type) else None
    return Declared(name, rng, words, choices, number)


@functools.cache
def _declared_init(init: Callable) -> dict[str, Declared]:
    hints = typing.get_type_hints(init, include_extras=True)
    names = [n for n in inspect.signature(init).parameters if n != "self"]
    return {n: _declare(n, hints[n]) for n in names if n in hints}


def declared(cls: type) -> dict[str, Declared]:
    """Declarations of `cls`'s constructor parameters, following ``**kwargs`` into base classes
    (the nearest class's declaration of a name wins)."""
    out: dict[str, Declared] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        init = getattr(init, "__wrapped__", init)
        for name, d in _declared_init(init).items():
            out.setdefault(name, d)
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return out


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return [value]


def check_arguments(decls: dict[str, Declared], arguments: dict[str, Any]) -> None:
    """Raise ValueError naming the parameter when an argument leaves its declaration."""
    for name, value in arguments.items():
        d = decls.get(name)
        if d is None or value is None:
            continue
        if d.choices is not None and value not in d.choices:
            raise ValueError(f"{name} must be one of {d.choices}, got {value!r}")
        items = _numbers(value) if d.range is not None or d.number else []
        for x in items:
            if d.number == "bool":
                ok = isinstance(x, bool)
            else:
                kind = numbers.Integral if d.number == "int" else numbers.Real
                ok = not isinstance(x, bool) and isinstance(x, kind)
                ok = ok and (math.isfinite(float(x)) if d.range is None else d.range.contains(float(x)))
            if not ok:
                what = {"int": "an integer", "bool": "True or False"}.get(d.number or "", "a number")
                rule = f" {d.range.describe()}" if d.range is not None else ""
                verb = "hold numbers" if isinstance(value, (list, tuple)) else f"be {what}"
                raise ValueError(f"{name} must {verb}{rule}, got {value!r}")


def validating(init: Callable) -> Callable:
    """Wrap a control's ``__init__`` so its arguments are checked first and the ones given are kept
    (as ``self._given``, for `Control.__repr__`)."""
    if getattr(init, "_checks_arguments", False):
        return init
    sig = inspect.signature(init)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        given = {}
        for name, value in list(bound.arguments.items())[1:]:
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                given.update(value)
            elif sig.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                given[name] = value
        check_arguments(_declared_init(init), given)
        if "_given" not in self.__dict__:
            self.__dict__["_given"] = given
        init(self, *args, **kwargs)

    checked._checks_arguments = True  # type: ignore[attr-defined]
    return checked
