"""Form fields of the web app, derived from the controls' parameter schemas (no Gradio here).

Every registered control (`attnctrl.controls.registry.CONTROLS`) becomes one panel; every
constructor parameter (`control_params`) becomes one `Field`, whose widget follows its type:

=========================  ===================================================================
``int`` / ``float``        a number box (a slider when its declared `Range` is bounded)
``bool``                   a checkbox
``one of a|b`` (Literal)   a dropdown
anything else              a text box in the command line's syntax (``key=value`` values:
                           comma-separated lists, ``;`` between layer selectors, ``none``),
                           converted by `parse_kwargs` exactly as ``--control NAME key=value``
=========================  ===================================================================

A field declared as taking prompt words (`attnctrl.params.Words`) is fed by the word chips of
the prompt. A field's value becomes a ``key=value`` string only when it differs
from the default, so the same strings give the command line (``--control NAME key=value``) and the
control instance (`parse_control`), and the app, the CLI and Python run the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from attnctrl.controls.registry import CONTROLS, ControlArgError, control_params
from attnctrl.params import Range

__all__ = ["Field", "Panel", "format_value", "panels"]

_SCALAR_KINDS = {"int": "int", "float": "float", "bool": "bool"}


def format_value(value: Any, selector: bool = False) -> str:
    """A Python value as the command line writes it (inverse of `parse_kwargs` for its types)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        sep = ";" if selector else ","
        return sep.join(format_value(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Field:
    """One constructor parameter of one control, as a form field."""

    control: str
    name: str
    type: str
    default: Any
    required: bool
    nullable: bool
    choices: tuple | None
    doc: str
    bounds: Range | None = None  # the declared range of a number
    word_joiner: str | None = None  # set when it takes prompt words: how several are joined

    @property
    def kind(self) -> str:
        """Widget kind: ``int``, ``float``, ``bool``, ``choice`` or ``text``."""
        if self.choices:
            return "choice"
        return _SCALAR_KINDS.get(self.type, "text")

    @property
    def selector(self) -> bool:
        return self.type == "selector"

    @property
    def words(self) -> bool:
        """Takes words of the prompt (fed by the word chips)."""
        return self.kind == "text" and not self.selector and self.word_joiner is not None

    @property
    def joiner(self) -> str:
        """How selected words are written into this field: as declared (groups one per word with
        ``;``, a phrase with spaces), lists comma-separated."""
        return ", " if self.word_joiner in (None, ",") else self.word_joiner

    def fill(self, selected) -> str:
        """The field's text for the selected word chips."""
        return self.joiner.join(selected or [])

    @property
    def range(self) -> tuple[float, float] | None:
        """(low, high) of a slider when the number's declared range is bounded (an open end
        moves in by one slider step)."""
        r = self.bounds
        if self.kind not in ("int", "float") or r is None or r.lo is None or r.hi is None:
            return None
        step = 1 if self.kind == "int" else 0.01
        lo, hi = r.lo + (step if r.lo_open else 0), r.hi - (step if r.hi_open else 0)
        return (lo, hi) if lo < hi else None

    @property
    def elem_id(self) -> str:
        return f"field-{self.control}-{self.name}"

    @property
    def label(self) -> str:
        extra = " (required)" if self.required else ""
        return f"{self.name}: {self.type}{extra}"

    @property
    def help(self) -> str:
        text = self.doc or ""
        if self.kind == "text":
            hint = "layer selector, several separated by ';'" if self.selector else "command-line syntax"
            if self.words:
                sep = "groups separated by ';'" if self.joiner == ";" else "comma-separated"
                hint = f"words of the prompt (pick them above), {sep}; 'word#2' = second occurrence"
            empty = (
                "required"
                if self.required
                else ("empty = default" if self.default is not None else "empty = none (default)")
            )
            text = f"{text} [{hint}; {empty}]".strip()
        elif self.kind in ("int", "float") and self.bounds is not None:
            text = f"{text} [{self.bounds.describe()}]".strip()
        return text

    def initial(self) -> Any:
        """The widget's initial value (the default)."""
        d = self.default
        if self.kind == "bool":
            return bool(d)
        if self.kind in ("int", "float"):
            return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None
        if self.kind == "choice":
            return d if d is not None else None
        return "" if d is None else format_value(d, self.selector)

    def item(self, value: Any) -> str | None:
        """``key=value`` for a widget value, or None when it leaves the default."""
        if self.kind == "text":
            text = "" if value is None else str(value).strip()
            if text == "" or text == self.initial():
                if self.required and text == "":
                    raise ControlArgError(
                        f"control {self.control}: {self.name!r} is required ({self.doc or self.type})"
                    )
                return None
            return f"{self.name}={text}"
        if self.kind == "bool":
            if bool(value) == bool(self.default):
                return None
            return f"{self.name}={format_value(bool(value))}"
        if self.kind == "choice":
            if value is None or value == "" or value == self.default:
                if self.required and value in (None, ""):
                    raise ControlArgError(f"control {self.control}: choose a value for {self.name!r}")
                return None
            return f"{self.name}={value}"
        # numbers
        if value is None or value == "":
            if self.required:
                raise ControlArgError(f"control {self.control}: {self.name!r} is required ({self.doc or self.type})")
            return None
        if self.kind == "int":
            if float(value) != int(float(value)):
                raise ControlArgError(f"control {self.control}: {self.name!r} must be an integer, got {value!r}")
            number: Any = int(float(value))
        else:
            number = float(value)
        if self.default is not None and not isinstance(self.default, bool) and number == self.default:
            return None
        return f"{self.name}={format_value(number)}"


@dataclass(frozen=True)
class Panel:
    """One registered control as a form: its name, class and fields."""

    name: str
    cls: type
    fields: tuple[Field, ...]

    @property
    def title(self) -> str:
        return f"{self.name} — {self.cls.__name__}"

    @property
    def summary(self) -> str:
        """First paragraph of the class docstring (it names the method and paper)."""
        doc = (self.cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split()) if doc else ""

    def items(self, values: list[Any]) -> list[str]:
        """``key=value`` strings for this panel's widget values (in field order)."""
        out = []
        for f, v in zip(self.fields, values):
            item = f.item(v)
            if item is not None:
                out.append(item)
        return out


def _field(name: str, p: dict) -> Field:
    choices = tuple(p["choices"]) if p.get("choices") else None
    return Field(
        name,
        p["name"],
        p["type"],
        p["default"],
        p["required"],
        p["nullable"],
        choices,
        p.get("doc") or "",
        p.get("range"),
        p.get("words"),
    )


def panels(controls: dict | None = None) -> list[Panel]:
    """A panel for every registered control, in registry order (the order controls run in)."""
    controls = CONTROLS if controls is None else controls
    return [Panel(name, cls, tuple(_field(name, p) for p in control_params(cls))) for name, cls in controls.items()]
