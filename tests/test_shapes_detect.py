"""The Shapes detector (`attnctrl.shapes.detect`): accuracy on rendered scenes, robustness, scoring."""

from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from attnctrl.shapes.data import COLORS, Scene, ShapeObject, caption_of, render, samples
from attnctrl.shapes.detect import (
    DetectedObject,
    aggregate,
    detect,
    named_objects,
    score,
)


def _exact(detected, scene, tol=2) -> bool:
    """Same multiset of (shape, colour) and every box within `tol` px of its ground truth."""
    if Counter((d.shape, d.color) for d in detected) != Counter((o.shape, o.color) for o in scene.objects):
        return False
    boxes = {(d.shape, d.color): d.box for d in detected}
    return all(max(abs(a - b) for a, b in zip(boxes[o.shape, o.color], o.box)) <= tol for o in scene.objects)


def _degrade(image: Image.Image, rng: np.random.Generator, blur=0.0, noise=0.0, specks=0.0, cast=False) -> np.ndarray:
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(image, np.float32)
    if noise:
        a = a + rng.normal(0, noise, a.shape)
    if specks:
        m = rng.random(a.shape[:2]) < specks
        a[m] = rng.integers(0, 256, (int(m.sum()), 3))
    if cast:  # a global colour cast: darker, tinted
        a = a * 0.9 + np.array([-20.0, 10.0, -15.0])
    return np.clip(a, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_exact_on_500_rendered_scenes():
    pairs = list(samples(2024, 600))
    assert {len(s.objects) for _, s in pairs} == {1, 2, 3}
    ok = sum(_exact(detect(im), sc) for im, sc in pairs)
    assert ok / len(pairs) >= 0.99, f"{ok}/{len(pairs)} exact"


@pytest.mark.parametrize(
    "kind, degrade, need",
    [
        ("noise", {"noise": 20}, 0.98),
        ("blur", {"blur": 0.8}, 0.98),
        ("blur+noise+specks", {"blur": 0.8, "noise": 15, "specks": 0.02}, 0.97),
        ("colour cast", {"noise": 10, "cast": True}, 0.97),
    ],
)
def test_robust_to_degraded_images(kind, degrade, need):
    rng = np.random.default_rng(7)
    pairs = list(samples(99, 200))
    ok = sum(_exact(detect(_degrade(im, rng, **degrade)), sc) for im, sc in pairs)
    assert ok / len(pairs) >= need, f"{kind}: {ok}/{len(pairs)} exact"


def test_speckles_and_blank_images_give_no_objects():
    rng = np.random.default_rng(0)
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert detect(white) == []
    assert detect(_degrade(white, rng, noise=20, specks=0.03)) == []


def test_array_inputs_and_other_sizes():
    scene = Scene((ShapeObject("square", "blue", "large", (10, 10, 36, 36)),), "a blue square")
    im = render(scene)
    floats = np.asarray(im, np.float32) / 255.0  # floats in [0, 1]
    chw = np.moveaxis(np.asarray(im), -1, 0)  # C×H×W
    for x in (im, np.asarray(im), floats, chw):
        (d,) = detect(x)
        assert (d.shape, d.color, d.box, d.area, d.size) == ("square", "blue", (10, 10, 36, 36), 26 * 26, "large")
    big = detect(im.resize((128, 128), Image.NEAREST))
    assert [(d.shape, d.color, d.box) for d in big] == [("square", "blue", (20, 20, 72, 72))]


def test_fragments_are_merged_and_off_colour_patches_ignored():
    objs = (
        ShapeObject("square", "red", "large", (6, 6, 32, 32)),
        ShapeObject("circle", "green", "small", (40, 40, 56, 56)),
    )
    a = np.array(render(Scene(objs, caption_of(objs))))
    a[18, 6:32] = 255  # a white line splits the square into two fragments
    a[40:44, 4:8] = COLORS["red"]  # a red blob far from the square: a separate (too small) component
    a[44:48, 44:48] = COLORS["blue"]  # an off-colour patch inside the circle
    det = detect(a)
    assert sorted((d.shape, d.color) for d in det) == [("circle", "green"), ("square", "red")]
    assert next(d for d in det if d.color == "red").box == (6, 6, 32, 32)


def _obj(shape, color, box=(0, 0, 16, 16)):
    return DetectedObject(shape, color, box, 200)


def test_score_hand_made_cases():
    caption = "a red circle and a blue square"
    good = [_obj("circle", "red"), _obj("square", "blue", (30, 30, 46, 46))]
    s = score(caption, good)
    assert (s["presence"], s["binding"], s["count"], s["presence_rate"], s["binding_rate"]) == (
        True,
        True,
        True,
        1.0,
        1.0,
    )
    assert s["relation"] is None

    missing = score(caption, good[:1])
    assert (missing["presence"], missing["presence_rate"], missing["count"]) == (False, 0.5, False)
    assert missing["binding"] is True  # the circle that is there has the right colour

    swapped = score(caption, [_obj("circle", "blue"), _obj("square", "red")])
    assert (swapped["presence"], swapped["binding"], swapped["binding_rate"], swapped["count"]) == (
        False,
        False,
        0.0,
        True,
    )

    extra = score(caption, [*good, _obj("triangle", "green")])
    assert (extra["presence"], extra["binding"], extra["count"]) == (True, True, False)

    nothing = score(caption, [])
    assert (nothing["presence"], nothing["binding"], nothing["binding_rate"], nothing["count"]) == (
        False,
        False,
        None,
        False,
    )


def test_score_relation_and_targets():
    left, right = _obj("triangle", "blue", (0, 20, 16, 36)), _obj("circle", "yellow", (40, 22, 56, 38))
    caption = "a blue triangle to the left of a yellow circle"
    assert named_objects(caption) == ([("blue", "triangle"), ("yellow", "circle")], "left of")
    assert score(caption, [left, right])["relation"] is True
    assert score(caption.replace("left", "right"), [left, right])["relation"] is False
    assert score("a blue triangle above a yellow circle", [left, right])["relation"] is False
    assert score(caption, [left])["relation"] is False
    scene = Scene(
        (ShapeObject("triangle", "blue", "small", left.box), ShapeObject("circle", "yellow", "small", right.box)),
        caption,
        "left of",
    )
    assert score(scene, [left, right]) == score(caption, [left, right])
    assert score([("blue", "triangle")], [left, right])["count"] is False
    with pytest.raises(ValueError):
        named_objects([("blue", "hexagon")])


def test_aggregate():
    s1 = score("a red circle", [_obj("circle", "red")])
    s2 = score("a red circle and a blue square", [_obj("circle", "blue")])
    agg = aggregate([s1, s2])
    assert agg == {"presence": 0.5, "presence_rate": 0.5, "binding": 0.5, "count": 0.5, "relation": None, "n": 2}


def test_detect_scores_rendered_captions():
    for image, scene in samples(5, 40):
        s = score(scene.caption, detect(image))
        assert s["presence"] and s["binding"] and s["count"] and s["relation"] in (None, True)


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "compositional.py"
    spec = importlib.util.spec_from_file_location("bench_compositional", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_derives_control_arguments_from_the_prompt():
    from attnctrl.controls.registry import CONTROLS

    bench = _bench()
    prompt = "a red circle, a red square and a large blue circle"
    assert bench.object_refs(prompt) == [("red", "circle"), ("red#2", "square"), ("blue", "circle#2")]
    for name, key, want in [
        ("attend-excite", "tokens", ["circle", "square", "circle#2"]),
        ("conform", "groups", [["red", "circle"], ["red#2", "square"], ["blue", "circle#2"]]),
        ("structured", "phrases", ["red circle", "red square", "blue circle"]),
    ]:
        if name in CONTROLS:
            assert bench.control_kwargs(CONTROLS[name], prompt)[key] == want
    every = bench._prompts(str(len(bench.PROMPTS)))
    assert sorted(every) == sorted(bench.PROMPTS)
    assert all(len(bench.object_refs(p)) in (2, 3) for p in every)
    assert sum(" of " in p or " above " in p or " below " in p for p in every) == 4


def test_benchmark_dry_run_end_to_end(tmp_path, capsys):
    import json

    bench = _bench()
    argv = [
        "--model",
        "tiny-sd",
        "--prompts",
        "1",
        "--seeds",
        "1",
        "--steps",
        "2",
        "--methods",
        "none",
        "--threads",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "command: bench/compositional.py --model tiny-sd" in text and "| none |" in text
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["steps"] == 2 and result["seeds"] == [0] and result["summary"]["none"]["n"] == 1
    assert Image.open(tmp_path / "grid.png").height > 64
