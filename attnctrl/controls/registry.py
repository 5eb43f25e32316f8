"""Controls by command-line name, and `key=value` strings turned into constructor arguments.

``parse_control("maps", ["resolutions=16,32"])`` builds ``AttentionMaps(resolutions=[16, 32])``.
Each value is converted with the type of its constructor parameter, taken from the annotation or,
without one, from the default value:

===================  ======================================================================
``int`` ``float``    ``steps=30``, ``scale=2.5``
``bool``             ``true/false``, ``1/0``, ``yes/no``, ``on/off`` (any case)
``str``              as given
lists, tuples        comma-separated items, each converted: ``tokens=car,sheep`` → ``["car", "sheep"]``,
                     ``resolutions=16,32`` → ``[16, 32]``; ``tuple[float, float]``: ``0,0.5`` → ``(0.0, 0.5)``
``Literal[...]``     one of the listed values
layer selectors      **never split on commas** (``layers=cross,res=16`` is one selector); several
                     selectors (matching any of them) are separated by ``;``:
                     ``layers=cross,res=16;self,mid``. A parameter is a selector when it is named
                     ``layers`` or its annotation mentions `attnctrl.selectors.Selector`.
no annotation,       guessed per item: integer, float, ``true``/``false``, else text; commas make
default ``None``     a list (``resolutions=16`` → ``16``, ``resolutions=16,32`` → ``[16, 32]``)
===================  ======================================================================

``none`` (or ``null``) sets an optional parameter (annotated ``X | None`` or defaulting to None)
to None. Keys may use ``-`` for ``_``. Errors are `ControlArgError` (a ``ValueError``) naming the
control, the key and what was expected.

Adding a control to the command line and the app is one line in `CONTROLS` (or `register`).
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from ..control import Control
from ..params import Declared, declared
from ..selectors import Selector
from .astar import AStar
from .conform import Conform
from .excite import AttendExcite
from .isolation import IsolationReposition
from .maps import AttentionMaps
from .modulation import AttentionModulation
from .mutual import MutualSelfAttention
from .panorama import Panorama
from .perturbation import PAG, HeadPerturbation
from .shared import SharedAttention
from .structured import StructuredGuidance

__all__ = ["CONTROLS", "ControlArgError", "register", "parse_control", "parse_kwargs", "control_params", "control_name"]

_BUILT_IN: tuple[type[Control], ...] = (
    AttentionMaps,
    PAG,
    HeadPerturbation,
    AttendExcite,
    AStar,
    Conform,
    AttentionModulation,
    SharedAttention,
    StructuredGuidance,
    IsolationReposition,
    MutualSelfAttention,
    Panorama,
)
#: Controls by their `Control.name` (the CLI and app name). Add a control here (or `register` it).
CONTROLS: dict[str, type[Control]] = {cls.name: cls for cls in _BUILT_IN}

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_INT = re.compile(r"^[+-]?\d+$")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null")
_SELECTOR_PARAMS = ("layers",)
_SELECTOR_SEP = ";"


class ControlArgError(ValueError):
    """An unknown control name, an unknown key, or a value that does not convert."""


def register(name: str, cls: type[Control]) -> type[Control]:
    """Expose `cls` as control `name` (its `Control.name`, lowercase, e.g. ``"astar"``) and return it.

    Registering another class under a taken name is an error; re-registering the same one is a no-op."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"control name {name!r}: use lowercase letters, digits, '-' or '_'")
    if not (isinstance(cls, type) and issubclass(cls, Control)):
        raise TypeError(f"{cls!r} is not a Control subclass")
    if CONTROLS.get(name, cls) is not cls:
        raise ValueError(f"control name {name!r} is already registered for {CONTROLS[name].__name__}")
    if cls.name != name:
        raise ValueError(
            f"{cls.__name__}.name is {cls.name!r}: register it under that name (the registry is keyed by it)"
        )
    CONTROLS[name] = cls
    return cls


def control_name(control: Control | type[Control]) -> str:
    """The registered CLI name of a control (instance or class)."""
    cls = control if isinstance(control, type) else type(control)
    if CONTROLS.get(cls.name) is cls:
        return cls.name
    raise KeyError(f"{cls.__name__} is not a registered control; known: {', '.join(CONTROLS)}")


# ------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class _Type:
    """How one parameter's string is converted.

    kind: int | float | bool | str | auto | selector | choice | list | tuple | union | unsupported.
    items: element type(s) (list: one; tuple: one per position; union: the scalar options).
    """

    kind: str
    nullable: bool = False
    items: tuple[_Type, ...] = ()
    choices: tuple = ()
    label: str = ""

    def describe(self) -> str:
        if self.kind in ("list", "tuple"):
            inner = ", ".join(t.describe() for t in self.items)
            return f"{self.kind}[{inner}]"
        if self.kind == "choice":
            return "one of " + "|".join(map(str, self.choices))
        if self.kind == "union":
            return " | ".join(t.describe() for t in self.items)
        if self.kind == "unsupported":
            return self.label or "unsupported"
        return self.kind


_SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}
_SEQUENCES = (list, tuple, set, frozenset, cabc.Sequence, cabc.Iterable, cabc.Collection, cabc.Set)


def _mentions_selector(tp: Any) -> bool:
    if tp is Selector:
        return True
    return any(_mentions_selector(a) for a in typing.get_args(tp))


def _from_annotation(tp: Any) -> _Type:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return _Type(_SCALARS[tp])
    if tp is Any:
        return _Type("auto")
    if origin is Literal:
        return _Type("choice", choices=args)
    if origin in (Union, types.UnionType):
        opts = [a for a in args if a is not type(None)]
        nullable = len(opts) < len(args)
        if len(opts) == 1:
            inner = _from_annotation(opts[0])
            return _Type(inner.kind, nullable or inner.nullable, inner.items, inner.choices, inner.label)
        parsed = [_from_annotation(a) for a in opts]
        seqs = [p for p in parsed if p.kind in ("list", "tuple")]
        scalars = [p for p in parsed if p.kind in ("int", "float", "bool", "str", "choice", "auto")]
        if len(seqs) + len(scalars) != len(parsed) or len(seqs) > 1:
            return _Type("unsupported", nullable, label=_label(tp))
        return _Type("union", nullable, tuple(scalars + seqs))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _Type("list", items=(_from_annotation(args[0]),))
        if args:
            return _Type("tuple", items=tuple(_from_annotation(a) for a in args))
        return _Type("list", items=(_Type("auto"),))
    if origin in _SEQUENCES or tp in _SEQUENCES:
        return _Type("list", items=(_from_annotation(args[0]) if args else _Type("auto"),))
    return _Type("unsupported", label=_label(tp))


def _label(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _param_type(name: str, param: inspect.Parameter, hints: dict) -> _Type:
    default = param.default
    nullable = default is None
    tp = hints.get(name, inspect.Parameter.empty)
    if name in _SELECTOR_PARAMS or (tp is not inspect.Parameter.empty and _mentions_selector(tp)):
        return _Type("selector", nullable)
    if tp is not inspect.Parameter.empty and not isinstance(tp, str):
        t = _from_annotation(tp)
        return _Type(t.kind, t.nullable or nullable, t.items, t.choices, t.label)
    if isinstance(default, bool):
        return _Type("bool")
    if type(default) in _SCALARS:
        return _Type(_SCALARS[type(default)])
    if isinstance(default, (list, tuple)):
        elem = _Type(_SCALARS[type(default[0])]) if default and type(default[0]) in _SCALARS else _Type("auto")
        return _Type("list", items=(elem,))
    return _Type("auto", nullable)


# ------------------------------------------------------------------------------- conversion


def _scalar(t: _Type, s: str) -> Any:
    """Convert one item; raises ValueError with no message on failure."""
    low = s.strip().lower()
    if t.kind == "int":
        if not _INT.match(s.strip()):
            raise ValueError
        return int(s)
    if t.kind == "float":
        return float(s)
    if t.kind == "bool":
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError
    if t.kind == "str":
        return s
    if t.kind == "choice":
        for c in t.choices:
            if s == str(c) or (isinstance(c, str) and low == c.lower()):
                return c
        raise ValueError
    if t.kind == "auto":
        if _INT.match(s.strip()):
            return int(s)
        try:
            return float(s)
        except ValueError:
            pass
        if low in ("true", "false"):
            return low == "true"
        return s
    if t.kind == "union":
        for opt in t.items:
            if opt.kind not in ("list", "tuple", "str"):
                try:
                    return _scalar(opt, s)
                except ValueError:
                    continue
        if any(o.kind == "str" for o in t.items):
            return s
        raise ValueError
    raise ValueError


def _split(s: str) -> list[str]:
    return [x.strip() for x in s.split(",")] if s.strip() else []


def _convert(t: _Type, s: str) -> Any:
    if t.nullable and s.strip().lower() in _NONE:
        return None
    if t.kind == "selector":
        parts = [p.strip() for p in s.split(_SELECTOR_SEP)]
        if not all(parts):
            raise ValueError
        return parts[0] if len(parts) == 1 else parts
    if t.kind == "unsupported":
        raise ValueError
    if t.kind == "list":
        return [_scalar(t.items[0], x) for x in _split(s)]
    if t.kind == "tuple":
        parts = _split(s)
        if len(parts) != len(t.items):
            raise ValueError
        return tuple(_scalar(it, x) for it, x in zip(t.items, parts))
    if t.kind == "union":
        seq = next((o for o in t.items if o.kind in ("list", "tuple")), None)
        if seq is not None and "," in s:
            return _convert(seq, s)
        try:
            return _scalar(t, s)
        except ValueError:
            if seq is None:
                raise
            return _convert(seq, s)
    if t.kind == "auto" and "," in s:
        return [_scalar(t, x) for x in _split(s)]
    return _scalar(t, s)


def _expected(t: _Type) -> str:
    if t.kind == "selector":
        return "a layer selector such as 'cross,res=16' (several separated by ';')"
    if t.kind == "unsupported":
        return f"a {t.describe()}, which cannot be given on the command line"
    if t.kind == "list":
        return f"a comma-separated list of {t.items[0].describe()}"
    if t.kind == "tuple":
        return f"{len(t.items)} comma-separated values ({', '.join(i.describe() for i in t.items)})"
    if t.kind == "bool":
        return "a bool (true/false, 1/0, yes/no)"
    text = t.describe()
    return text + (" or none" if t.nullable else "")


# -------------------------------------------------------------------------------- signatures


def _signature(cls: type) -> list[tuple[inspect.Parameter, dict]]:
    """Keyword-settable constructor parameters with their resolved type hints, following
    ``**kwargs`` into base classes' constructors."""
    out: dict[str, tuple[inspect.Parameter, dict]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # unresolvable forward references: fall back to the defaults
            hints = {}
        has_var_kw = False
        for name, p in inspect.signature(init).parameters.items():
            if name == "self" or p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY:
                continue
            if p.kind is p.VAR_KEYWORD:
                has_var_kw = True
                continue
            out.setdefault(name, (p, hints))
        if not has_var_kw or klass is object:
            break
    return list(out.values())


def _doc_lines(cls: type) -> dict[str, str]:
    """``name: text`` entries of the ``Args:`` section of the class (or ``__init__``) docstring."""
    docs: dict[str, str] = {}
    for doc in (inspect.getdoc(vars(cls).get("__init__")) or "", inspect.getdoc(cls) or ""):
        current, indent, in_args = None, None, False
        for line in doc.splitlines():
            stripped = line.strip()
            if stripped in ("Args:", "Arguments:", "Parameters:"):
                in_args, current = True, None
                continue
            if not in_args:
                continue
            if not stripped:
                current = None
                continue
            lead = len(line) - len(line.lstrip())
            m = re.match(r"^(\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m and (indent is None or lead <= indent):
                indent, current = lead, m.group(1)
                docs.setdefault(current, m.group(3).strip())
            elif current is not None and indent is not None and lead > indent:
                docs[current] = (docs[current] + " " + stripped).strip()
            else:
                in_args, current = False, None
    return docs


def _types(cls: type) -> dict[str, _Type]:
    return {p.name: _param_type(p.name, p, hints) for p, hints in _signature(cls)}


def control_params(cls: type[Control]) -> list[dict]:
    """Parameter schema of a control's constructor, for forms such as the Gradio app.

    One dict per parameter, in signature order: ``name``, ``type`` (``"int"``, ``"float"``,
    ``"bool"``, ``"str"``, ``"selector"``, ``"auto"``, ``"list[int]"``, ``"tuple[float, float]"``,
    ``"one of a|b"``, ...), ``default`` (None when absent), ``required``, ``nullable``,
    ``choices`` (for Literal parameters, else None), ``range`` (its `attnctrl.params.Range`, or
    None), ``words`` (how picked prompt words are joined into it when it takes words of the
    prompt, else None) and ``doc`` (its line in the docstring).
    """
    docs = _doc_lines(cls)
    decls = declared(cls)
    out = []
    for p, hints in _signature(cls):
        t = _param_type(p.name, p, hints)
        required = p.default is inspect.Parameter.empty
        decl = decls.get(p.name) or Declared(p.name)
        out.append(
            {
                "name": p.name,
                "type": t.describe(),
                "default": None if required else p.default,
                "required": required,
                "nullable": t.nullable,
                "choices": list(t.choices) if t.kind == "choice" else None,
                "range": decl.range,
                "words": decl.words.joiner if decl.words is not None else None,
                "doc": docs.get(p.name, ""),
            }
        )
    return out


# --------------------------------------------------------------------------------- parsing


def _lookup(name: str) -> type[Control]:
    key = name.strip().lower() if isinstance(name, str) else name
    cls = CONTROLS.get(key)
    if cls is None:
        raise ControlArgError(f"unknown control {name!r}; known controls: {', '.join(sorted(CONTROLS))}")
    return cls


def parse_kwargs(cls: type[Control], items: list[str], *, name: str | None = None) -> dict[str, Any]:
    """Constructor keyword arguments of `cls` from ``key=value`` strings (see the module doc)."""
    who = name or cls.__name__
    types_ = _types(cls)
    kwargs: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ControlArgError(f"control {who}: expected key=value, got {item!r}")
        if key not in types_:
            valid = ", ".join(types_) or "(none)"
            raise ControlArgError(f"control {who} has no parameter {key!r}; valid keys: {valid}")
        if key in kwargs:
            raise ControlArgError(f"control {who}: {key!r} is given twice")
        t = types_[key]
        try:
            kwargs[key] = _convert(t, value)
        except (ValueError, TypeError):
            raise ControlArgError(f"control {who}: bad value {value!r} for {key!r}: expected {_expected(t)}") from None
    return kwargs


def parse_control(name: str, items: list[str] | tuple[str, ...] = ()) -> Control:
    """Build the control registered as `name` from ``key=value`` strings.

    ``parse_control("maps", ["layers=cross,res=16", "steps=0,0.5"])``. Raises `ControlArgError`
    for an unknown control, key or value, and for values its constructor rejects.
    """
    cls = _lookup(name)
    key = name.strip().lower()
    kwargs = parse_kwargs(cls, list(items), name=key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ControlArgError(f"control {key}: {err}") from err
