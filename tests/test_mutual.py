"""MutualSelfAttention (MasaCtrl; SynPS on FLUX): source rows, K/V replacement, layer counting, errors."""
import pytest
import torch
import torch.nn.functional as F
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs
from PIL import Image

import attnctrl as ac
from attnctrl.control import Control
from attnctrl.controls.mutual import MutualSelfAttention, forward_order
from attnctrl.controls.registry import parse_control
from attnctrl.selectors import select

PROMPTS = ["a cat sitting", "a cat jumping", "a cat running"]
SD_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def run(tiny, name, controls=(), prompts=PROMPTS, **kw):
    return ControlledPipeline(tiny(name))(prompts, seed=0, controls=list(controls), **call_kwargs(name, **kw))


class Steps(Control):
    def begin(self, run):
        self.latents = []

    def after_step(self, latents, state):
        self.latents.append(latents.clone())


@pytest.mark.parametrize("name, kw", [("tiny-sd", {"start_step": 1, "start_layer": 2}), ("tiny-sd3", {"start_step": 1}),
                                      ("tiny-flux", {})])
def test_source_rows_are_vanilla_and_targets_change(tiny, name, kw):
    stock = run(tiny, name).images
    out = run(tiny, name, [ac.MutualSelfAttention(**kw)]).images
    assert (out[0] - stock[0]).abs().max().item() <= 1e-5
    assert (out[1:] - stock[1:]).abs().max().item() > 1e-4


class Before(Control):
    """Placed before MutualSelfAttention: keeps this layer's own K/V, then checks the output."""

    default_layers = f"name={SD_LAYER}"

    def __init__(self, source):
        super().__init__()
        self.source, self.checked = source, 0

    def qkv(self, call):
        self.k, self.v = call.k.clone(), call.v.clone()

    def out(self, call, o):
        n = call.run.layout.images
        for b in call.run.layout.branches:
            r = call.run.layout.rows(b)
            s = r.start + self.source
            for t in range(r.start, r.stop):
                want = F.scaled_dot_product_attention(call.q[t : t + 1], self.k[s : s + 1], self.v[s : s + 1])
                assert torch.allclose(o[t : t + 1], want, atol=1e-6), (b, t, n)
        self.checked += 1
        return o


@pytest.mark.parametrize("source", [0, 2])
def test_targets_read_the_source_keys_and_values(tiny, source):
    check = Before(source)
    run(tiny, "tiny-sd", [check, ac.MutualSelfAttention(source=source, start_step=0, layers=f"name={SD_LAYER}")])
    assert check.checked == 3


def test_layers_are_counted_in_forward_order_like_masactrl(tiny):
    pipe = ControlledPipeline(tiny("tiny-sd"))
    layers = pipe.layers()
    order = forward_order([lay for lay, _ in select(layers, "self")])
    assert [lay.place for lay in order] == ["down", "down", "mid", "up", "up", "up", "up"]
    c = MutualSelfAttention(start_layer=2)
    kept = c.narrow_layers(select(layers, c.layers, (32, 32)), (32, 32))
    assert {lay.name for lay, _ in kept} == {lay.name for lay in order[2:]}
    with pytest.raises(ValueError, match="start_layer=10 but this model has 7 self-attention layers"):
        run(tiny, "tiny-sd", [MutualSelfAttention()])  # MasaCtrl's SD default (16 layers) does not fit


def test_before_start_step_and_outside_layers_is_stock(tiny):
    plain, ctrl = Steps(), Steps()
    run(tiny, "tiny-sd", [plain])
    run(tiny, "tiny-sd", [MutualSelfAttention(start_step=2, start_layer=3), ctrl])
    for i in (0, 1):
        assert (ctrl.latents[i] - plain.latents[i]).abs().max().item() <= 1e-5
    assert (ctrl.latents[2][1:] - plain.latents[2][1:]).abs().max().item() > 1e-5

    class Own(Control):
        default_layers = "name=down_blocks.1.attentions.0.transformer_blocks.0.attn1"  # layer 1 < start_layer

        def out(self, call, o):
            assert torch.allclose(o, F.scaled_dot_product_attention(call.q, call.k, call.v), atol=1e-6)
            self.n = getattr(self, "n", 0) + 1
            return o

    probe = Own()
    run(tiny, "tiny-sd", [MutualSelfAttention(start_step=0, start_layer=3), probe])
    assert probe.n == 3


def test_one_image_is_a_no_op(tiny):
    stock = run(tiny, "tiny-sd", prompts=["a cat"]).images
    out = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=0, start_layer=0)], prompts=["a cat"]).images
    assert (out - stock).abs().max().item() <= 1e-5


def test_mask_guided_variant(tiny):
    full = torch.ones(32, 32)
    plain = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2)]).images
    same = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2, source_mask=full, target_mask=full)]).images
    assert torch.equal(plain, same)  # all foreground: plain mutual attention
    half = torch.zeros(64, 64)
    half[:, :32] = 1
    out = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2, source_mask=half, target_mask=half)]).images
    assert (out[0] - plain[0]).abs().max().item() <= 1e-5 and (out[1:] - plain[1:]).abs().max().item() > 1e-5


def test_flux_synps_defaults_and_weight():
    from attnctrl.layers import LayerInfo

    layers = [LayerInfo(f"transformer_blocks.{i}.attn", "joint", "blocks", i, 1, 2) for i in range(19)]
    layers += [LayerInfo(f"single_transformer_blocks.{i}.attn", "joint", "single", i, 1, 2) for i in range(38)]
    c = MutualSelfAttention()
    kept = c.narrow_layers([(lay, None) for lay in layers], (64, 64))
    assert len(kept) == 57  # the editing measure reads every block
    assert sorted(c._names) == sorted(
        [f"transformer_blocks.{i}.attn" for i in (0, 7, 8, 9, 10, 18)]
        + [f"single_transformer_blocks.{i}.attn" for i in (6, 9, 18, 23, 26, 31, 37)]
    )
    st = {"step": 3, "count": 4, "sum": torch.tensor(3.8), "w": 1.0, "rope": {}}

    class Call:
        class run:
            class state:
                index = 4

    c._new_step(Call, st)  # mean measure 0.95 between τ_min 0.9 and τ_max 1.0
    assert abs(float(st["w"]) - 0.5) < 1e-6 and st["count"] == 0


def test_flux_modulation_acts_after_the_first_step(tiny):
    kw = {"layers": "transformer_blocks.0"}
    on, off = Steps(), Steps()
    run(tiny, "tiny-flux", [MutualSelfAttention(**kw), on])
    run(tiny, "tiny-flux", [MutualSelfAttention(pe_modulation=False, **kw), off])
    assert torch.equal(on.latents[0], off.latents[0])  # w = 1 at the first step
    assert (on.latents[2] - off.latents[2]).abs().max().item() > 0


def test_composes_with_attention_maps(tiny):
    plain = run(tiny, "tiny-sd", [ac.AttentionMaps()])
    both = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=0, start_layer=2), ac.AttentionMaps()])
    for res, m in plain.maps.by_res.items():
        assert torch.allclose(both.maps.by_res[res][0], m[0], atol=1e-5)
        assert not torch.allclose(both.maps.by_res[res][1:], m[1:], atol=1e-5)


class Inputs(Control):
    """Placed after MutualSelfAttention: the latents each step starts from."""

    def begin(self, run):
        self.latents = []

    def before_step(self, latents, state, denoise):
        self.latents.append(latents.clone())
        return latents


@pytest.mark.parametrize("pin", [True, False])
def test_real_source_image_is_inverted_into_the_source_row(tiny, pin):
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    prompts = ["a cat", "a cat jumping"]
    seen = Inputs()
    c = MutualSelfAttention(start_step=1, start_layer=2, source_image=image, pin_source=pin)
    out = run(tiny, "tiny-sd", [c, seen], prompts=prompts)
    inv = ac.ddim_invert(tiny("tiny-sd"), image, "a cat", num_inference_steps=3)
    assert torch.equal(seen.latents[0][0], inv.at_step(0)[0])  # starts from the inverted z_T
    for i in (1, 2):
        assert torch.equal(seen.latents[i][0], inv.at_step(i)[0]) == pin
    assert isinstance(c, MutualSelfAttention) and torch.isfinite(out.images).all()
    generated = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2)], prompts=prompts)
    assert (out.images[1] - generated.images[1]).abs().max().item() > 1e-3  # the target reads the real image


class NoStep(Control):
    def after_step(self, latents, state):
        raise AssertionError("a step ran")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": 3}, "outside the batch"),
        ({"source_mask": torch.ones(10, 10), "target_mask": torch.ones(10, 10)}, "size 10x10"),
    ],
)
def test_bad_input_fails_before_any_step(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(tiny, "tiny-sd", [MutualSelfAttention(start_layer=2, **kwargs), NoStep()])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": -1}, "source"),
        ({"start_layer": 2, "layers": "up"}, "not both"),
        ({"source_mask": torch.ones(4, 4)}, "both"),
        ({"pe_min": 1.0, "pe_max": 0.5}, "pe_min"),
        ({"source_prompt": "a cat"}, "source_image"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MutualSelfAttention(**kwargs)


def test_inversion_needs_a_ddim_schedule(tiny):
    image = Image.new("RGB", (64, 64), "gray")
    with pytest.raises(ValueError, match="DDIM"):
        run(tiny, "tiny-sdxl", [MutualSelfAttention(start_layer=2, source_image=image), NoStep()], prompts=["a cat", "a dog"])


def test_cli_forms():
    c = parse_control("mutual", ["source=1", "start_step=2", "start_layer=3", "pe_modulation=false"])
    assert (c.source, c.start_step, c.start_layer, c.pe_modulation) == (1, 2, 3, False)
