"""Layer selectors pick exactly the layers they name, and say so when they pick none."""

import pytest

from attnctrl.layers import LayerInfo, list_layers
from attnctrl.selectors import Selector, SelectorError, select


def dit_layers(n=12):
    """A FLUX-like list: n double blocks and n single blocks."""
    double = [LayerInfo(f"transformer_blocks.{i}.attn", "joint", "blocks", i, 1, 4) for i in range(n)]
    single = [LayerInfo(f"single_transformer_blocks.{i}.attn", "joint", "single", i, 1, 4) for i in range(n)]
    return double + single


def names(picked):
    return [layer.name for layer, _ in picked]


def test_dotted_path_matches_whole_segments_only():
    layers = dit_layers()
    assert names(select(layers, "transformer_blocks.1")) == ["transformer_blocks.1.attn"]
    # "blocks.1" is not a segment run of "transformer_blocks.1" nor of "transformer_blocks.10"
    with pytest.raises(SelectorError, match="blocks.1"):
        select(layers, "blocks.1")
    assert names(select(layers, "single_transformer_blocks.1")) == ["single_transformer_blocks.1.attn"]


def test_block_index_is_exact_and_place_separates_double_from_single():
    layers = dit_layers()
    assert names(select(layers, "blocks,block=1")) == ["transformer_blocks.1.attn"]
    assert names(select(layers, "single,block=10|11")) == [
        "single_transformer_blocks.10.attn",
        "single_transformer_blocks.11.attn",
    ]


def test_regex_is_anchored():
    layers = dit_layers()
    assert names(select(layers, r"re=transformer_blocks\.1\.attn")) == ["transformer_blocks.1.attn"]
    with pytest.raises(SelectorError):
        select(layers, r"re=blocks\.1\.attn")  # would match with re.search, not with fullmatch


def test_empty_match_names_the_selector():
    layers = dit_layers(2)
    with pytest.raises(SelectorError) as err:
        select(layers, "down,cross", owner="AttentionMaps")
    assert "'down,cross'" in str(err.value) and "AttentionMaps" in str(err.value)


@pytest.mark.parametrize("bad", ["", "res=abc", "colour=red", "cross,,up", "re=(unclosed"])
def test_malformed_selectors_are_errors(bad):
    with pytest.raises(SelectorError):
        Selector.parse(bad)


def test_heads_restriction_and_range_check():
    layers = dit_layers(2)
    picked = select(layers, "blocks,block=0,heads=1|3")
    assert picked[0][1] == frozenset({1, 3})
    with pytest.raises(SelectorError, match="heads"):
        select(layers, "blocks,heads=7")


def test_or_of_selectors_unions_heads():
    layers = dit_layers(2)
    picked = select(layers, ["name=transformer_blocks.0.attn,heads=0", "name=transformer_blocks.0.attn,heads=2"])
    assert picked == [(layers[0], frozenset({0, 2}))]


def test_sdxl_cross_res16_lists_exactly_the_16px_cross_attention(tiny):
    pipe = tiny("tiny-sdxl")
    layers = list_layers(pipe.unet)
    # tiny-sdxl: latent 32x32; down_blocks.1 and up_blocks.1 run at 16x16 (one downsample)
    expected = sorted(
        k[: -len(".processor")]
        for k in pipe.unet.attn_processors
        if k.endswith("attn2.processor") and (k.startswith("down_blocks.1.") or k.startswith("up_blocks.1."))
    )
    assert len(expected) == 3
    assert sorted(names(select(layers, "cross,res=16", (32, 32)))) == expected
    # the same layers are 32x32 when the image is twice as large
    assert sorted(names(select(layers, "cross,res=32", (64, 64)))) == expected


def test_unet_kinds_and_places(tiny):
    layers = list_layers(tiny("tiny-sd").unet)
    assert all(n.endswith("attn1") for n in names(select(layers, "self")))
    assert names(select(layers, "mid,cross")) == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert names(select(layers, "up_blocks.2,attn2")) == [
        "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    ]


def test_joint_layers_have_both_parts_and_dual_attention_is_self(tiny):
    layers = list_layers(tiny("tiny-sd35").transformer)
    assert names(select(layers, "cross")) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert names(select(layers, "self")) == [
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",
        "transformer_blocks.1.attn",
    ]
    assert names(select(layers, "attn2")) == ["transformer_blocks.0.attn2"]


@pytest.mark.parametrize("dual", [(), (0, 1, 10)])
def test_pag_diffusers_matching_picks_what_diffusers_pag_picks(dual):
    """`PAG(match="diffusers")` picks exactly the modules diffusers' own `_set_pag_attn_processor`
    sets (run here on a 12-block SD3 transformer, SD3.5-style attn2 included); our default does not."""
    from types import SimpleNamespace

    from diffusers import SD3Transformer2DModel, StableDiffusion3PAGPipeline

    import attnctrl as ac

    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=12,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=16,
        dual_attention_layers=dual,
    )
    layers = list_layers(model)
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}

    def diffusers_picks(spec):
        marker = object()
        try:
            StableDiffusion3PAGPipeline._set_pag_attn_processor(
                SimpleNamespace(transformer=model, _pag_attn_processors=(marker, marker)), spec, True
            )
            return sorted(n for n, m in model.named_modules() if getattr(m, "processor", None) is marker)
        finally:
            for n, m in model.named_modules():
                if n in processors:
                    m.processor = processors[n]

    for spec in (["transformer_blocks.1"], ["blocks.1", "blocks.3"], ["attn2"]):
        if spec == ["attn2"] and not dual:
            with pytest.raises(ValueError):
                diffusers_picks(spec)
            with pytest.raises(SelectorError):
                select(layers, ac.PAG(spec, match="diffusers").layers)
            continue
        picked = sorted(names(select(layers, ac.PAG(spec, match="diffusers").layers)))
        assert picked == diffusers_picks(spec)
    attn = [f"transformer_blocks.{i}.attn" for i in (1, 10, 11)]
    attn2 = [f"transformer_blocks.{i}.attn2" for i in (1, 10) if i in dual]
    assert sorted(names(select(layers, ac.PAG("transformer_blocks.1", match="diffusers").layers))) == sorted(
        attn + attn2
    )
    # the whole-segment default: block 1 only
    assert sorted(names(select(layers, ac.PAG("transformer_blocks.1").layers))) == sorted(
        ["transformer_blocks.1.attn"] + (["transformer_blocks.1.attn2"] if 1 in dual else [])
    )
    with pytest.raises(ValueError, match="match must be one of"):
        ac.PAG("mid", match="regex")
