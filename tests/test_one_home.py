"""Each fact below has one home; these tests pin the home and that its users go through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import attnctrl as ac
from attnctrl import attention, maps, tokens
from attnctrl.models.loading import family_of
from attnctrl.state import BatchLayout, RunContext, TextEncoders, images_per_prompt, prompt_index

ROOT = Path(__file__).resolve().parents[1]


def source(rel: str) -> str:
    return (ROOT / rel).read_text()


# ------------------------------------------------------------------ token groups: tokens.parse_groups

FORMS = [
    "red car;white sheep",
    ["red car", "white sheep"],  # the CLI's groups=red car,white sheep
    [["red", "car"], ["white", "sheep"]],
    (("red", " car "), ["white", "sheep"]),
]


@pytest.mark.parametrize("groups", FORMS)
def test_parse_groups_reads_every_documented_form(groups):
    assert tokens.parse_groups(groups) == [["red", "car"], ["white", "sheep"]]


def test_parse_groups_edge_cases():
    assert tokens.parse_groups(None) == [] == tokens.parse_groups("  ")
    assert tokens.parse_groups([[2, 3], 5]) == [[2, 3], [5]]  # raw token indices (Conform)
    assert tokens.parse_groups([["light blue", "sheep"]]) == [["light blue", "sheep"]]
    for bad, msg in [
        ("red car;;sheep", "empty group"),
        (["a;b"], "';'"),
        ([["red", " "]], "non-empty"),
        ([[]], "empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            tokens.parse_groups(bad)


@pytest.mark.parametrize("groups", FORMS)
def test_both_controls_read_groups_with_the_one_parser(groups):
    expected = tokens.parse_groups(groups)
    assert ac.Conform(groups=groups).groups == expected
    assert ac.AttentionModulation(groups=groups).groups == expected
    for path in ("attnctrl/controls/conform.py", "attnctrl/controls/modulation.py"):
        assert "def parse_groups" not in source(path)


def test_each_control_keeps_its_own_group_rules():
    with pytest.raises(ValueError, match="must not overlap"):
        ac.Conform(groups="red car;Car sheep")
    with pytest.raises(ValueError, match="groups overlap"):
        ac.AttentionModulation(groups="red car;Car sheep")
    assert ac.Conform(groups=[[2, 3], [5]]).groups == [[2, 3], [5]]
    with pytest.raises(ValueError, match="non-empty string"):
        ac.AttentionModulation(groups=[[2, 3], [5]])  # words only


# ------------------------------------------------------------------ which prompt is image i: state


def _run(images: int, prompts: list[str]) -> RunContext:
    return RunContext(family="sd", layout=BatchLayout.build(images, True), grid=(0, 0), prompts=prompts)


def test_prompt_of_and_images_per_prompt():
    assert images_per_prompt(6, 3) == 2 and images_per_prompt(1, 3) == 1 and images_per_prompt(4, 0) == 4
    assert [prompt_index(i, 6, 3) for i in range(6)] == [0, 0, 1, 1, 2, 2]
    run = _run(6, ["a", "b", "c"])
    assert run.images_per_prompt() == 2
    assert [run.prompt_of(i) for i in range(6)] == ["a", "a", "b", "b", "c", "c"]
    result = maps.AttentionMapResult({(2, 2): torch.rand(6, 4, 2, 2)}, prompts=["a", "b", "c"])
    assert [result.prompt_of(i) for i in range(6)] == [run.prompt_of(i) for i in range(6)]


def test_no_other_module_divides_images_by_prompts():
    for path in (
        "attnctrl/maps.py",
        "attnctrl/controls/structured.py",
        "attnctrl/controls/modulation.py",
    ):
        text = source(path)
        assert "// len(" not in text, path


# ------------------------------------------------------------------ model family: family_of


@pytest.mark.parametrize(
    "name, family", [("tiny-sd", "sd"), ("tiny-sdxl", "sdxl"), ("tiny-sd3", "sd3"), ("tiny-flux", "flux")]
)
def test_tokens_infers_the_family_with_family_of(tiny, name, family):
    pipe = tiny(name)
    assert family_of(pipe) == family
    assert tokens._family(pipe, None) == family
    assert tokens._family(ac.ControlledPipeline(pipe), None) == family
    assert tokens._family(pipe, "SD") == "sd"  # an explicit family wins


def test_text_encoders_need_an_explicit_family():
    text = TextEncoders(tokenizer=object(), tokenizer_3=None)
    with pytest.raises(tokens.TokenError, match="pass family="):
        tokens._family(text, None)
    assert tokens._family(text, "flux") == "flux"
    assert "stablediffusion3" not in source("attnctrl/tokens.py")
    assert "def _family" not in source("attnctrl/inversion.py")


# ------------------------------------------------------------------ SDPA scale: attention.sdpa_scale


class _Attn:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_sdpa_scale_and_layer_scale():
    assert attention.sdpa_scale(64**-0.5, 64) is None
    assert attention.sdpa_scale(1.0, 64) == 1.0
    assert attention.sdpa_scale(0.125 / 0.8, 64) == 0.125 / 0.8
    assert attention.layer_scale(_Attn(scale=0.5, head_dim=8)) == 0.5
    assert attention.layer_scale(_Attn(head_dim=8)) == 8**-0.5  # FluxAttention has no scale


def test_processors_and_controls_use_the_scale_rule():
    for path in ("processors/flux.py", "processors/sd3.py", "processors/unet.py"):
        text = source(path)
        assert "layer_scale(attn)" in text and "**-0.5" not in text, path
    for path in ("attnctrl/attention.py", "attnctrl/controls/structured.py"):
        assert "sdpa_scale(call.scale" in source(path), path
    assert source("attnctrl/attention.py").count("** -0.5") == 0


# ------------------------------------------------------------------ heatmap overlay: maps.overlay


def test_overlay_is_the_one_heatmap_rule():
    torch.manual_seed(0)
    m = torch.rand(4, 4)
    picture = Image.new("RGB", (40, 30), (200, 30, 90))
    grey = maps.grey_base(picture, 16)
    assert grey.size == (16, 16) and grey.mode == "RGB"
    out = maps.overlay(m, grey, 16, 0.55)
    assert out.size == (16, 16)
    assert maps.overlay(m, None, 16).size == (16, 16)
    # constant maps do not divide by zero
    assert maps.overlay(torch.zeros(4, 4), grey, 16).size == (16, 16)


def test_render_and_app_tiles_use_overlay():
    from app.runner import heatmap_tiles

    torch.manual_seed(0)
    by_res = {(4, 4): torch.rand(1, 77, 4, 4).softmax(1)}

    class Result(maps.AttentionMapResult):
        def words(self, image, size=None):
            return {"red": self.by_res[(4, 4)][image, 1], "car": self.by_res[(4, 4)][image, 2]}

    result = Result(by_res, prompts=["red car"])
    picture = Image.new("RGB", (64, 64), (10, 200, 30))
    tiles = heatmap_tiles(result, [picture], size=24)
    grey = maps.grey_base(picture, 24)
    for (tile, caption), (word, m) in zip(tiles, result.words(0).items()):
        assert caption == word
        assert tile.tobytes() == maps.overlay(m, grey, 24, 0.55).tobytes()
    grid = result.render(0, picture, tile=24)
    grey = maps.grey_base(picture, 24)
    first = grid.crop((4 + 28, 4 + 26, 4 + 28 + 24, 4 + 26 + 24))  # pad 4, title 26, second tile
    assert first.tobytes() == maps.overlay(result.words(0)["red"], grey, 24).tobytes()
