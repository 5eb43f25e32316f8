"""Parameter declarations (`attnctrl.params`): one declaration read by the checks, the command
line, the app's panels and `repr`."""

from __future__ import annotations

import inspect
from typing import Annotated, Literal

import pytest

import attnctrl.controls as controls
from app.schema import panels
from attnctrl.control import Control
from attnctrl.controls.registry import CONTROLS, ControlArgError, control_params, parse_control
from attnctrl.params import GROUPS, WORDS, Range, check_arguments, declared


@pytest.mark.parametrize(
    ("rng", "inside", "outside", "text"),
    [
        (Range(0, 1), [0, 0.5, 1], [-1e-9, 1.0000001, float("nan")], "in [0, 1]"),
        (Range(0, 1, lo_open=True), [1e-12, 1], [0, 2], "in (0, 1]"),
        (Range(0, 1, hi_open=True), [0, 0.999], [1], "in [0, 1)"),
        (Range(0), [0, 1e30], [-1, float("inf")], ">= 0"),
        (Range(0, lo_open=True), [1e-9], [0], "> 0"),
        (Range(hi=2), [-5, 2], [2.1], "<= 2"),
    ],
)
def test_range_bounds_and_wording(rng, inside, outside, text):
    assert all(rng.contains(x) for x in inside)
    assert not any(rng.contains(x) for x in outside)
    assert rng.describe() == text


class _Toy(Control):
    name = "toy"

    def __init__(
        self,
        words: Annotated[list[str] | None, WORDS] = None,
        count: Annotated[int, Range(1)] = 2,
        weight: Annotated[float | None, Range(0, 1)] = None,
        pair: Annotated[tuple[float, float], Range(0)] = (0.0, 1.0),
        mode: Literal["a", "b"] = "a",
        flag: bool = False,
        layers=None,
    ):
        super().__init__(layers=layers)
        self.body_ran = True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count must be an integer >= 1, got 0"),
        ({"count": 2.0}, "count must be an integer >= 1, got 2.0"),
        ({"count": True}, "count must be an integer >= 1, got True"),
        ({"weight": 1.5}, "weight must be a number in [0, 1], got 1.5"),
        ({"pair": (0.5, -1.0)}, "pair must hold numbers >= 0, got (0.5, -1.0)"),
        ({"mode": "c"}, "mode must be one of ('a', 'b'), got 'c'"),
        ({"flag": 1}, "flag must be True or False, got 1"),
    ],
)
def test_a_subclass_is_checked_against_its_declarations_before_its_body(kwargs, message):
    with pytest.raises(ValueError) as err:
        _Toy(**kwargs)
    assert str(err.value) == message


def test_declared_values_pass_and_none_is_left_to_the_control():
    toy = _Toy(words=["cat"], count=3, weight=None, pair=(1, 2), mode="b", flag=True)
    assert toy.body_ran and toy.layers == "self"
    assert repr(toy) == "_Toy(words=['cat'], count=3, weight=None, pair=(1, 2), mode='b', flag=True)"


def test_every_default_satisfies_its_declaration():
    for name, cls in CONTROLS.items():
        decls = declared(cls)
        defaults = {p["name"]: p["default"] for p in control_params(cls) if not p["required"] and p["name"] in decls}
        check_arguments(decls, defaults)  # raises on a default outside its own range or choices
        assert decls, f"{name} declares no parameter"


def test_the_command_line_reports_the_declared_range():
    with pytest.raises(ControlArgError, match=r"control heads: softness must be a number in \[0, 1\], got 1.5"):
        parse_control("heads", ["heads=self,heads=0", "softness=1.5"])
    with pytest.raises(ControlArgError, match="control isolation: dropout must be a number in \\[0, 1\\), got 1.0"):
        parse_control("isolation", ["subjects=cat", "dropout=1"])


def test_the_app_feeds_prompt_words_exactly_to_the_declared_word_parameters():
    fed = {(p.name, f.name): f.joiner for p in panels() for f in p.fields if f.words}
    assert fed == {
        ("attend-excite", "tokens"): ", ",
        ("astar", "tokens"): ", ",
        ("conform", "groups"): ";",
        ("modulation", "groups"): ";",
        ("structured", "phrases"): ", ",
        ("isolation", "subjects"): ", ",
        ("mutual", "mask_tokens"): ", ",
        ("mutual", "target_mask_tokens"): ", ",
    }
    # a name that merely looks like words is not fed (the old name rule fed this pair of weights)
    assert ("modulation", "entity_weight") not in fed
    assert declared(controls.Conform)["groups"].words is GROUPS


def test_sliders_follow_declared_bounded_ranges():
    fields = {(p.name, f.name): f for p in panels() for f in p.fields}
    assert fields["heads", "softness"].range == (0.0, 1.0)
    assert fields["isolation", "dropout"].range == (0.0, 0.99)  # [0, 1): the open end moves in a step
    assert fields["mutual", "mask_threshold"].range == (0.01, 0.99)
    assert fields["pag", "scale"].range is None  # >= 0 only: a number box
    assert "[>= 0]" in fields["pag", "scale"].help


def test_repr_shows_the_arguments_given_and_rebuilds_the_same_control():
    made = [
        controls.PAG(scale=2.0, layers="mid"),
        controls.AStar(tokens=["cat", "dog"], threshold=0.4),
        controls.IsolationReposition(["cat"], dropout=0.25),
        controls.MutualSelfAttention(source=1, start_step=4),
    ]
    namespace = {n: getattr(controls, n) for n in controls.__all__}
    for c in made:
        again = eval(repr(c), namespace)
        assert type(again) is type(c) and repr(again) == repr(c)
    assert repr(made[0]) == "PAG(layers='mid', scale=2.0)"  # signature order


def test_control_params_carry_the_declarations():
    params = {p["name"]: p for p in control_params(controls.HeadPerturbation)}
    assert params["softness"]["range"] == Range(0, 1)
    assert params["kind"]["choices"] == ["identity", "uniform"]
    assert params["heads"]["words"] is None
    sig = inspect.signature(controls.HeadPerturbation)
    assert list(sig.parameters)[:2] == ["heads", "scale"]  # the checking wrapper keeps the signature
