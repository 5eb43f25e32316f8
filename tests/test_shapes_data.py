"""The Shapes world: deterministic scenes, exact rendering, captions that match the objects."""

import numpy as np
import pytest

from attnctrl.shapes.data import (
    BACKGROUND,
    COLORS,
    GAP,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption_of,
    parse_caption,
    random_scene,
    render,
    samples,
)

N = 300


def _scenes(seed=0, n=N, n_objects=None):
    return list(samples(seed, n, n_objects))


def test_samples_are_deterministic_per_seed():
    a, b, c = _scenes(3, 20), _scenes(3, 20), _scenes(4, 20)
    assert [s for _, s in a] == [s for _, s in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(a, b))
    assert [s for _, s in a] != [s for _, s in c]


def test_scene_invariants():
    counts = set()
    for image, scene in _scenes():
        assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        objs = scene.objects
        counts.add(len(objs))
        assert 1 <= len(objs) <= 3
        assert len({(o.shape, o.color) for o in objs}) == len(objs)
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert o.shape in SHAPES and o.color in COLORS
            assert x1 - x0 == y1 - y0 == SIZES[o.size]
            assert 0 <= x0 and 0 <= y0 and x1 <= IMAGE_SIZE and y1 <= IMAGE_SIZE
        for i, a in enumerate(objs):  # at least GAP empty pixels between any two boxes
            for b in objs[i + 1 :]:
                assert (
                    a.box[2] + GAP <= b.box[0]
                    or b.box[2] + GAP <= a.box[0]
                    or a.box[3] + GAP <= b.box[1]
                    or b.box[3] + GAP <= a.box[1]
                ), scene
    assert counts == {1, 2, 3}
    assert all(len(next(samples(1, 5, n))[1].objects) == n for n in (1, 2, 3))


def test_rendering_is_exact_flat_colour_inside_boxes():
    allowed = {BACKGROUND, *COLORS.values()}
    for image, scene in _scenes(n=60):
        px = np.asarray(image)
        assert {tuple(p) for p in px.reshape(-1, 3)} <= allowed  # no anti-aliasing
        inside = np.zeros(px.shape[:2], bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            inside[y0:y1, x0:x1] = True
            region = px[y0:y1, x0:x1]
            mask = (region == COLORS[o.color]).all(-1)
            fill = mask.mean()
            expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[o.shape]
            assert abs(fill - expected) < 0.08, (o, fill)
            assert mask[-1].all() if o.shape != "circle" else mask[(y1 - y0) // 2].all()
            if o.shape == "triangle":  # upright: narrow top row, full bottom row, symmetric
                assert mask[0].sum() <= 2 and np.array_equal(mask, mask[:, ::-1])
        assert (px[~inside] == BACKGROUND).all()


def test_captions_name_the_objects_in_order():
    for _, scene in _scenes():
        assert parse_caption(scene.caption) == [(o.color, o.shape) for o in scene.objects]
        assert scene.caption == caption_of(scene.objects, scene.relation)
    objs = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    assert caption_of(objs[:1]) == "a red circle"
    assert caption_of(objs[:2]) == "a red circle and a blue square"
    assert caption_of(objs) == "a red circle, a blue square and a green triangle"
    assert (
        caption_of([("blue", "triangle"), ("yellow", "circle")], "left of")
        == "a blue triangle to the left of a yellow circle"
    )
    assert caption_of(objs[:2], "above") == "a red circle above a blue square"
    assert parse_caption("A small Red circle, a large blue square") == [("red", "circle"), ("blue", "square")]
    with pytest.raises(ValueError):
        caption_of(objs, "above")


@pytest.mark.parametrize("relation", RELATIONS)
def test_relation_placement(relation):
    rng = np.random.default_rng(7)
    for _ in range(40):
        scene = random_scene(rng, 2, relation)
        assert scene.relation == relation and len(scene.objects) == 2
        (ax, ay), (bx, by) = [((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2) for o in scene.objects]
        holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
        assert holds, scene


def test_relations_occur_and_render():
    relations = {s.relation for _, s in _scenes()}
    assert relations == {None, *RELATIONS}
    scene = Scene((ShapeObject("square", "red", "small", (0, 0, 16, 16)),), "a red square")
    px = np.asarray(render(scene))
    assert (px[:16, :16] == COLORS["red"]).all() and (px[16:] == BACKGROUND).all()
