"""The `attnctrl` command line (run in-process through `main`) and the control-argument registry."""

from __future__ import annotations

import json
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from attnctrl import AttentionMaps, Control
from attnctrl.cli import main
from attnctrl.controls import registry
from attnctrl.controls.registry import ControlArgError, control_params, parse_control, parse_kwargs

PROMPT = "a red car and a white sheep"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def png_params(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["attnctrl"])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# ------------------------------------------------------------------------------------ generate


def test_generate_metadata_roundtrips(tmp_path, capsys):
    first = tmp_path / "first.png"
    rc, out, err = run(
        capsys,
        "generate",
        PROMPT,
        "--model",
        "tiny-sd",
        "--seed",
        3,
        "--steps",
        2,
        "--guidance",
        6,
        "--negative",
        "blurry",
        "--control",
        "maps",
        "resolutions=16",
        "layers=cross,up",
        "-o",
        first,
    )
    assert rc == 0, err
    maps = tmp_path / "first.maps.png"  # an explicit maps control writes its heatmaps too
    assert out.split() == [str(first), str(maps)]
    with Image.open(first) as im:
        text = dict(im.text)
        assert im.size == (64, 64)
    p = json.loads(text["attnctrl"])
    assert p["prompt"] == PROMPT and text["prompt"] == PROMPT
    assert (p["model"], p["seed"], p["steps"], p["guidance"], p["negative_prompt"]) == ("tiny-sd", 3, 2, 6.0, "blurry")
    assert (p["height"], p["width"], p["num_images"], p["image_index"]) == (64, 64, 1, 0)
    assert p["controls"] == [{"name": "maps", "args": {"resolutions": "16", "layers": "cross,up"}}]
    assert p["attnctrl_version"] and text["seed"] == "3" and text["negative_prompt"] == "blurry"

    # regenerate from the metadata alone
    again = tmp_path / "again.png"
    argv = [
        "generate",
        p["prompt"],
        "--model",
        p["model"],
        "--seed",
        p["seed"],
        "--steps",
        p["steps"],
        "--guidance",
        p["guidance"],
        "--height",
        p["height"],
        "--width",
        p["width"],
        "--negative",
        p["negative_prompt"],
    ]
    for c in p["controls"]:
        argv += ["--control", c["name"], *(f"{k}={v}" for k, v in c["args"].items())]
    rc, _, err = run(capsys, *argv, "-o", again)
    assert rc == 0, err
    assert np.array_equal(pixels(first), pixels(again))
    assert first.read_bytes() == again.read_bytes()  # same pixels and same metadata
    assert shlex.split(text["command"]) == ["attnctrl", *map(str, argv)]  # the recorded command is that run
    assert pixels(first).std() > 0 and pixels(maps).shape[0] > 64  # a picture; the maps are a labelled grid


def test_generate_maps_and_numbered_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(
        capsys, "generate", PROMPT, "--seed", 0, "--steps", 2, "--num-images", 2, "--maps", "-o", "pic.png"
    )
    assert rc == 0, err
    assert out.split() == ["pic_0.png", "pic_1.png", "pic_0.maps.png", "pic_1.maps.png"]
    assert sorted(os.listdir(tmp_path)) == sorted(out.split())  # no temp files left behind
    assert [png_params(tmp_path / f"pic_{i}.png")["image_index"] for i in range(2)] == [0, 1]
    assert png_params(tmp_path / "pic_0.png")["controls"] == [{"name": "maps", "args": {}}]
    assert not np.array_equal(pixels(tmp_path / "pic_0.png"), pixels(tmp_path / "pic_1.png"))

    rc, out, err = run(capsys, "generate", "a cat", "--steps", 1, "--maps-out", "heat.png")
    assert rc == 0, err
    assert out.split() == ["attnctrl.png", "heat.png"]
    assert "random seed" in err and png_params(tmp_path / "attnctrl.png")["model"] == "shapes"


# -------------------------------------------------------------------------------------- layers


def _expected_sdxl_cross_at(res: int) -> set[str]:
    """Cross-attention layers of tiny-sdxl whose token grid is res×res, from the UNet config alone:
    every down block but the last halves the grid, every up block but the last doubles it."""
    from attnctrl.models.tiny import build_tiny

    unet = build_tiny("tiny-sdxl").unet
    n = len(unet.config.block_out_channels)
    side = unet.config.sample_size  # 64 px image -> 32x32 latents
    out = set()
    for key in unet.attn_processors:
        name = key[: -len(".processor")]
        seg = name.split(".")
        if seg[-1] != "attn2":
            continue
        if seg[0] == "down_blocks":
            r = side >> int(seg[1])
        elif seg[0] == "up_blocks":
            r = side >> (n - 1 - int(seg[1]))
        else:
            r = side >> (n - 1)
        if r == res:
            out.add(name)
    return out


def _table_names(out: str) -> list[str]:
    return [
        line.split()[0] for line in out.splitlines() if line.startswith(("down_blocks.", "mid_block.", "up_blocks."))
    ]


def test_layers_select(capsys):
    expected = _expected_sdxl_cross_at(16)
    assert len(expected) == 3
    rc, out, err = run(capsys, "layers", "tiny-sdxl", "--select", "cross,res=16")
    assert rc == 0, err
    assert sorted(_table_names(out)) == sorted(expected)
    assert out.strip().splitlines()[-1].startswith("3 of 22 attention layers")
    assert all(line.split()[4] == "16x16" for line in out.splitlines() if line.startswith(("down_", "up_")))

    rc, out, _ = run(capsys, "layers", "tiny-sdxl")
    assert rc == 0 and len(_table_names(out)) == 22 and "22 attention layers (11 self, 11 cross)" in out
    rc, out, _ = run(capsys, "layers", "tiny-sdxl", "--select", "cross,res=32", "--height", 128, "--width", 128)
    assert rc == 0 and sorted(_table_names(out)) == sorted(expected)  # twice the size: 16 -> 32


def test_tokens(capsys):
    rc, out, err = run(capsys, "tokens", "a red car and a red sheep", "--model", "tiny-sdxl", "--word", "red#2")
    assert rc == 0, err
    assert "tokenizer_2" in out and "<|startoftext|>" in out
    for word in ("red", "car", "sheep", "red#2"):
        assert word in out
    assert "'red#2': tokenizer [6], tokenizer_2 [6]" in out


# ----------------------------------------------------------------------------------- bad input


BAD = {
    "empty prompt": ["generate", "  ", "-o", "{d}/x.png"],
    "negative steps": ["generate", "a car", "--steps", "-3", "-o", "{d}/x.png"],
    "zero images": ["generate", "a car", "--num-images", "0", "-o", "{d}/x.png"],
    "unknown model": ["generate", "a car", "--model", "no-such-model", "-o", "{d}/x.png"],
    "missing directory": ["generate", "a car", "-o", "{d}/missing/x.png"],
    "output is a directory": ["generate", "a car", "-o", "{d}/taken.png"],
    "not a png": ["generate", "a car", "-o", "{d}/x.jpg"],
    "unknown control": ["generate", "a car", "--control", "nope", "-o", "{d}/x.png"],
    "unknown control key": ["generate", "a car", "--control", "maps", "bogus=1", "-o", "{d}/x.png"],
    "prompt after control": ["generate", "--control", "maps", "a car", "-o", "{d}/x.png"],
    "selector matches nothing": [
        "generate",
        "a car",
        "--steps",
        "1",
        "--control",
        "maps",
        "layers=cross,res=3",
        "-o",
        "{d}/x.png",
    ],
    "unknown word": ["tokens", "a red car", "--word", "sheep"],
    "layers: no match": ["layers", "tiny-sdxl", "--select", "cross,res=3"],
    "layers: bad selector": ["layers", "tiny-sd", "--select", "bogus=1"],
    "layers: unknown model": ["layers", "nope"],
    "no command": [],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.png").mkdir()
    rc, out, err = run(capsys, *(a.format(d=tmp_path) for a in BAD[case]))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnctrl: error: "), err
    assert out == ""
    assert os.listdir(tmp_path) == ["taken.png"]  # nothing written, no temp file left


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    rc, _, err = run(capsys, "generate", "a car", "-o", ro / "x.png")
    assert rc == 2 and "cannot write" in err and os.listdir(ro) == []


def test_genuine_bugs_keep_their_traceback(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr("attnctrl.cli.common.load_model", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "a car", "-o", str(tmp_path / "x.png")])
    assert os.listdir(tmp_path) == []


def test_help_exits_zero(capsys, monkeypatch):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["attnctrl", "layers", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("attnctrl", run_name="__main__")
    assert done.value.code == 0 and "--select" in capsys.readouterr().out


@pytest.mark.slow
def test_installed_entry_point():
    exe = shutil.which("attnctrl", path=str(Path(sys.executable).parent))
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "attnctrl", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout and "layers" in proc.stdout and "tokens" in proc.stdout


# ------------------------------------------------------------------------------ parse_control


class _Demo(Control):
    """A control with one parameter of each kind.

    Args:
        layers: where it acts.
        scale: how strong; a float
            spanning two lines.
        count: an int.
        on: a bool.
        label: a string.
        tokens: words of the prompt.
        res: grid heights.
        mode: one of two.
        window: a (start, stop) pair.
        limit: an optional int.
        loose: no annotation.
    """

    name = "demo"

    def __init__(
        self,
        layers=None,
        scale: float = 1.0,
        count: int = 3,
        on: bool = False,
        label: str = "x",
        tokens: Sequence[str | int] = (),
        res: list[int] | None = None,
        mode: Literal["fast", "exact"] = "fast",
        window: tuple[float, float] = (0.0, 1.0),
        limit: int | None = None,
        loose=None,
    ):
        super().__init__(layers=layers)
        self.kw = dict(
            scale=scale,
            count=count,
            on=on,
            label=label,
            tokens=tokens,
            res=res,
            mode=mode,
            window=window,
            limit=limit,
            loose=loose,
        )


def test_parse_kwargs_conversions():
    kw = parse_kwargs(
        _Demo,
        [
            "layers=cross,res=16",
            "scale=2.5",
            "count=7",
            "on=yes",
            "label=a,b",
            "tokens=car,white sheep,3",
            "res=16,32",
            "mode=EXACT",
            "window=0,0.5",
            "limit=none",
            "loose=1.5",
        ],
    )
    assert kw == {
        "layers": "cross,res=16",
        "scale": 2.5,
        "count": 7,
        "on": True,
        "label": "a,b",
        "tokens": ["car", "white sheep", 3],
        "res": [16, 32],
        "mode": "exact",
        "window": (0.0, 0.5),
        "limit": None,
        "loose": 1.5,
    }
    for text, value in [("true", True), ("0", False), ("No", False), ("1", True)]:
        assert parse_kwargs(_Demo, [f"on={text}"])["on"] is value
    assert parse_kwargs(_Demo, ["layers=cross,res=16;self,mid"])["layers"] == ["cross,res=16", "self,mid"]
    assert parse_kwargs(_Demo, ["res=16"])["res"] == [16] and parse_kwargs(_Demo, ["scale=3"])["scale"] == 3.0
    assert parse_kwargs(_Demo, ["loose=a,2,true"])["loose"] == ["a", 2, True]
    assert parse_kwargs(_Demo, ["count=-2"])["count"] == -2 and parse_kwargs(_Demo, ["limit=4"])["limit"] == 4


@pytest.mark.parametrize(
    "items, words",
    [
        (["count=2.5"], ["'count'", "int"]),
        (["scale=big"], ["'scale'", "float"]),
        (["on=maybe"], ["'on'", "bool"]),
        (["res=16,x"], ["'res'", "list of int"]),
        (["mode=slow"], ["'mode'", "fast|exact"]),
        (["window=0.5"], ["'window'", "2 comma-separated"]),
        (["count=none"], ["'count'", "int"]),
        (["layers="], ["'layers'", "selector"]),
        (["colour=red"], ["'colour'", "valid keys: layers, scale, count"]),
        (["count"], ["key=value"]),
        (["count=1", "count=2"], ["twice"]),
    ],
)
def test_parse_kwargs_errors(items, words):
    with pytest.raises(ControlArgError) as err:
        parse_kwargs(_Demo, items, name="demo")
    assert isinstance(err.value, ValueError)
    for w in words:
        assert w in str(err.value)


def test_parse_control_and_registry(monkeypatch):
    c = parse_control("maps", ["resolutions=16,32", "steps=0,0.5"])
    assert isinstance(c, AttentionMaps) and c.resolutions == [16, 32] and c.steps == [0, 0.5]
    assert parse_control("maps", ["layers=cross,up"]).layers == "cross,up"
    with pytest.raises(ControlArgError, match="unknown control 'nosuch'; known controls: .*maps"):
        parse_control("nosuch", [])
    with pytest.raises(ControlArgError, match="valid keys: layers, resolutions, steps"):
        parse_control("maps", ["tokens=car"])

    monkeypatch.setitem(registry.CONTROLS, "demo", _Demo)  # adding a control is one entry
    assert parse_control("demo", ["count=5"]).kw["count"] == 5
    with pytest.raises(ValueError, match="already registered"):
        registry.register("demo", AttentionMaps)
    assert registry.register("demo", _Demo) is _Demo and registry.control_name(_Demo()) == "demo"


def test_control_params_schema():
    schema = {p["name"]: p for p in control_params(_Demo)}
    assert list(schema) == [
        "layers",
        "scale",
        "count",
        "on",
        "label",
        "tokens",
        "res",
        "mode",
        "window",
        "limit",
        "loose",
    ]
    assert schema["scale"] == {
        "name": "scale",
        "type": "float",
        "default": 1.0,
        "required": False,
        "nullable": False,
        "choices": None,
        "range": None,
        "words": None,
        "doc": "how strong; a float spanning two lines.",
    }
    assert schema["layers"]["type"] == "selector" and schema["res"]["type"] == "list[int]"
    assert schema["res"]["nullable"] and schema["mode"]["choices"] == ["fast", "exact"]
    assert schema["window"]["type"] == "tuple[float, float]" and schema["limit"]["type"] == "int"
    maps = [p["name"] for p in control_params(AttentionMaps)]
    assert maps == ["layers", "resolutions", "steps"]
    assert all(p["doc"] for p in control_params(AttentionMaps))
