"""AttentionModulation (Wu et al. 2024, arXiv 2404.13899): neutral = stock, each component acts,
and the paper's stated properties (masked groups get exactly zero attention, τ is a tempered
softmax, weights reweight-and-renormalise) checked on single layer calls."""

import pytest
import torch

import attnctrl as ac
from attnctrl import attention
from attnctrl.control import Control
from attnctrl.controls.registry import (
    CONTROLS,
    ControlArgError,
    control_params,
    parse_control,
)
from attnctrl.pipelines import ControlledPipeline
from attnctrl.state import BatchLayout, RunContext, StepState
from attnctrl.tokens import TokenError, joint_text_indices
from conftest import call_kwargs, processors_of, stock_latents

PROMPT = "a red car and a white sheep"
GROUPS = "red car;white sheep"
JOINT = ["tiny-sd3", "tiny-flux"]


def run(tiny, name, controls, prompt=PROMPT, **extra):
    return ControlledPipeline(tiny(name))(prompt, seed=0, controls=controls, **call_kwargs(name, **extra)).images


def diff(a, b) -> float:
    return (a - b).abs().max().item()


def at(index: int, num_steps: int) -> RunContext:
    """A bare run at step `index` of `num_steps` (for asking `attends`)."""
    return RunContext(
        family="sd", layout=BatchLayout.build(1, True), grid=(0, 0), state=StepState(index, 0.0, num_steps)
    )


# ---------------------------------------------------------------------------------- neutral


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", *JOINT])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"groups": GROUPS, "mask": False},
        {"groups": "white sheep"},
        {"groups": GROUPS, "mask": False, "entity_weight": (1.0, 1.0), "attribute_weight": 1.0, "temperature": 1.0},
        {"temperature": 0.5, "temperature_steps": (0, 0)},
    ],
)
def test_neutral_is_stock(tiny, name, kwargs):
    out = run(tiny, name, [ac.AttentionModulation(**kwargs)])
    assert diff(out, stock_latents(tiny(name), PROMPT, **call_kwargs(name))) <= 1e-5


def test_neutral_runs_no_hook(tiny, monkeypatch):
    """Neutral settings are inactive at every step, so the layers keep their stock processor."""
    from attnctrl.processors import unet

    def forbidden(*args, **kwargs):
        raise AssertionError("a layer ran the controlled path with a neutral AttentionModulation")

    monkeypatch.setattr(unet, "attend", forbidden)
    for c in [
        ac.AttentionModulation(),
        ac.AttentionModulation(groups=GROUPS, mask=False),
        ac.AttentionModulation("sheep"),
    ]:
        assert not any(c.attends(at(i, 3)) for i in range(3))
        run(tiny, "tiny-sd", [c])


# ------------------------------------------------------------------------- each component acts


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", *JOINT])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.5, "temperature_steps": (0, 1.0)},
        {"groups": GROUPS},
        {"groups": GROUPS, "mask": False, "entity_weight": (3.0, 1.0)},
        {"groups": GROUPS, "mask": False, "attribute_weight": (1.0, 3.0)},
    ],
)
def test_each_component_changes_the_output(tiny, name, kwargs):
    out = run(tiny, name, [ac.AttentionModulation(**kwargs)])
    assert torch.isfinite(out).all()
    assert diff(out, stock_latents(tiny(name), PROMPT, **call_kwargs(name))) > 1e-4


def test_temperature_only_in_its_steps(tiny):
    kw = {"num_inference_steps": 4}
    stock = stock_latents(tiny("tiny-sd"), PROMPT, **call_kwargs("tiny-sd", **kw))
    never = run(tiny, "tiny-sd", [ac.AttentionModulation(temperature=0.5, temperature_steps=(4, 8))], **kw)
    late = run(tiny, "tiny-sd", [ac.AttentionModulation(temperature=0.5, temperature_steps=(2, 4))], **kw)
    full = run(tiny, "tiny-sd", [ac.AttentionModulation(temperature=0.5, temperature_steps=(0, 4))], **kw)
    assert diff(never, stock) <= 1e-5
    assert diff(late, stock) > 1e-4 and diff(late, full) > 1e-4


def test_phases_split_the_weights(tiny):
    kw = {"num_inference_steps": 4}
    early = ac.AttentionModulation(groups=GROUPS, mask=False, entity_weight=(3.0, 1.0), phase_split=2)
    assert [early.phase(i, 4).entity_weight for i in range(4)] == [3.0, 3.0, 1.0, 1.0]
    late = ac.AttentionModulation(groups=GROUPS, mask=False, entity_weight=(1.0, 3.0), phase_split=0.5)
    assert [late.attends(at(i, 4)) for i in range(4)] == [False, False, True, True]
    assert all(late.active(StepState(i, 0.0, 4)) for i in range(4))  # `steps` (the window) is not what decides
    a, b = run(tiny, "tiny-sd", [early], **kw), run(tiny, "tiny-sd", [late], **kw)
    assert diff(a, b) > 1e-4


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_stays_on_sdpa(tiny, name, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("explicit softmax")

    monkeypatch.setattr(attention, "attention_probs", forbidden)
    c = ac.AttentionModulation(GROUPS, temperature=0.7, entity_weight=(2.0, 1.0), attribute_weight=(1.0, 2.0))
    assert torch.isfinite(run(tiny, name, [c])).all()


# ------------------------------------------------------------------- properties on layer calls


def group_columns(pipe, prompt, groups, family):
    """Per group, its text-key columns (all words) and its entity columns (last word)."""
    msl = 32 if family in ("sd3", "flux") else None
    cols = [
        [i for w in g for i in joint_text_indices(pipe, prompt, w, family, max_sequence_length=msl)] for g in groups
    ]
    ent = [joint_text_indices(pipe, prompt, g[-1], family, max_sequence_length=msl) for g in groups]
    return cols, ent


class MaskProbe(Control):
    """After AttentionModulation: reads the explicit probabilities of the cross part and checks the
    object-focused masking against an independent full-softmax assignment."""

    default_layers = "cross"

    def __init__(self, cols, ent):
        super().__init__()
        self.cols, self.ent, self.checked, self.assigned = cols, ent, 0, torch.zeros(len(cols))

    def probs(self, call, p):
        rows, qi, kt = call.run.layout.rows("cond"), call.q_image, call.k_text
        q, k = call.q[rows, :, qi], call.k[rows, :, kt]
        full = (torch.matmul(q, k.transpose(-1, -2)).float() * call.scale).softmax(-1)  # unmasked, over text
        mass = torch.stack([full[..., e].sum(-1) for e in self.ent], -1)  # (R, H, Lq, G)
        assigned = mass.log().mean(1).argmax(-1)  # head-averaged log mass (geometric mean over heads)
        block = p[rows][:, :, qi][..., kt]
        others = [c for c in range(block.shape[-1]) if not any(c in g for g in self.cols)]
        for g, cols in enumerate(self.cols):
            mine = (assigned == g)[:, None, :].expand(-1, block.shape[1], -1)
            on = block[..., cols]
            assert (on[~mine] == 0).all(), "a patch attends to a group it is not assigned to"
            assert (on[mine] > 0).all()
            self.assigned[g] += (assigned == g).sum()
        assert (block[..., others] > 0).all()  # BOS/EOS/padding/function words stay visible
        if call.run.layout.has("uncond"):
            assert (p[call.run.layout.rows("uncond")][:, :, qi][..., kt] > 0).all()  # negative prompt untouched
        self.checked += 1
        return p


@pytest.mark.parametrize(
    "name, family", [("tiny-sd", "sd"), ("tiny-sdxl", "sdxl"), ("tiny-sd3", "sd3"), ("tiny-flux", "flux")]
)
def test_masked_patches_have_zero_probability_on_other_groups(tiny, name, family):
    groups = [["red", "car"], ["white", "sheep"]]
    probe = MaskProbe(*group_columns(tiny(name), PROMPT, groups, family))
    run(tiny, name, [ac.AttentionModulation(groups), probe])
    assert probe.checked > 0 and (probe.assigned > 0).all()  # both groups own patches somewhere


def test_masking_follows_each_prompt(tiny):
    prompts = [PROMPT, "a white sheep beside a red car"]
    groups = [["red", "car"], ["white", "sheep"]]

    class PerPrompt(Control):
        default_layers = "cross"
        checked = 0

        def probs(self, call, p):
            for i, prompt in enumerate(prompts):
                cols, ent = group_columns(tiny("tiny-sd"), prompt, groups, "sd")
                probe = MaskProbe(cols, ent)
                rows = slice(call.run.layout.rows("cond").start + 2 * i, call.run.layout.rows("cond").start + 2 * i + 2)
                sub = type("C", (), {})()
                sub.__dict__.update(call.__dict__)
                sub.q, sub.k = call.q[rows], call.k[rows]
                sub.run = type("R", (), {"layout": ac.BatchLayout(("cond",), 2)})()
                probe.probs(sub, p[rows])
            self.checked += 1
            return p

    spy = PerPrompt()
    run(
        tiny,
        "tiny-sd",
        [ac.AttentionModulation(groups), spy],
        prompt=prompts,
        num_images_per_prompt=2,
        num_inference_steps=2,
    )
    assert spy.checked > 0


class WeightProbe(Control):
    """Reweighting then renormalising: p' ∝ p · w on the image→text row."""

    default_layers = "cross"

    def __init__(self, weights):
        super().__init__()
        self.weights, self.checked = weights, 0

    def probs(self, call, p):
        rows, qi, kt = call.run.layout.rows("cond"), call.q_image, call.k_text
        full = (torch.matmul(call.q, call.k.transpose(-1, -2)).float() * call.scale).softmax(-1)[rows][:, :, qi]
        w = torch.ones(full.shape[-1])
        w[[kt.start + c for c in self.weights]] = torch.tensor(list(self.weights.values()))
        expected = full * w
        expected = expected / expected.sum(-1, keepdim=True)
        assert torch.allclose(p[rows][:, :, qi].float(), expected, atol=1e-6)
        self.checked += 1
        return p


@pytest.mark.parametrize("name, family", [("tiny-sd", "sd"), ("tiny-flux", "flux")])
def test_weights_reweight_and_renormalise(tiny, name, family):
    cols, ent = group_columns(tiny(name), PROMPT, [["red", "car"], ["white", "sheep"]], family)
    entity = {c for e in ent for c in e}
    weights = {c: (3.0 if c in entity else 0.5) for g in cols for c in g}
    probe = WeightProbe(weights)
    c = ac.AttentionModulation(
        GROUPS, mask=False, entity_weight=(3.0, 1.0), attribute_weight=(0.5, 2.0), phase_split=1.0
    )
    run(tiny, name, [c, probe])
    assert probe.checked > 0


class TemperatureProbe(Control):
    """On UNet self-attention the layer output equals ``softmax(QKᵀ·scale/τ)·V``."""

    def __init__(self, layer, tau):
        super().__init__(layers=f"name={layer}")
        self.tau, self.checked = tau, 0

    def out(self, call, o):
        q, k, v = call.q, call.k, call.v
        scale = call.module.scale if hasattr(call.module, "scale") else q.shape[-1] ** -0.5
        assert call.scale == pytest.approx(scale / self.tau)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale / self.tau
        expected = logits.softmax(-1) @ v
        assert torch.allclose(o, expected, atol=1e-5)
        self.checked += 1
        return o


def test_temperature_is_a_tempered_softmax_on_self_attention(tiny):
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    probe = TemperatureProbe(layer, 0.6)
    run(tiny, "tiny-sd", [ac.AttentionModulation(temperature=0.6, temperature_steps=(0, 1.0)), probe])
    assert probe.checked == 3


def test_joint_temperature_divides_the_image_key_logits(tiny):
    seen = {}

    class Keys(Control):
        default_layers = "name=single_transformer_blocks.0.attn"

        def qkv(self, call):
            seen.setdefault("before", call.k.clone())

    class After(Control):
        default_layers = "name=single_transformer_blocks.0.attn"

        def qkv(self, call):
            seen.setdefault("after", call.k.clone())
            seen.setdefault("image", call.k_image)

    run(tiny, "tiny-flux", [Keys(), ac.AttentionModulation(temperature=0.5, temperature_steps=(0, 1.0)), After()])
    img = seen["image"]
    assert torch.allclose(seen["after"][:, :, img], seen["before"][:, :, img] / 0.5)
    assert torch.equal(seen["after"][:, :, : img.start], seen["before"][:, :, : img.start])  # text keys untouched


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "groups, error, message",
    [
        ("red car;white horse", TokenError, "horse"),
        ([["a", "red", "car"], ["a#1", "white", "sheep"]], ValueError, "overlap"),
        ([["red car"], ["car", "sheep"]], ValueError, "overlap"),
        ("red car;white sheep#2", TokenError, "occurrence"),
    ],
)
def test_bad_words_fail_before_any_step(tiny, groups, error, message):
    pipe = tiny("tiny-sd")
    before = processors_of(pipe)
    steps = []

    class Spy(Control):
        def after_step(self, run, latents):
            steps.append(run.state.index)

    with pytest.raises(error, match=message):
        run(tiny, "tiny-sd", [Spy(), ac.AttentionModulation(groups)])
    assert steps == [] and processors_of(pipe) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": "red car;red sheep"}, "overlap"),
        ({"groups": "red car;;white sheep"}, "empty group"),
        ({"groups": ["red car;white sheep", "dog"]}, "';'"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"groups": GROUPS, "entity_weight": (0.0, 1.0)}, "entity_weight"),
        ({"groups": GROUPS, "attribute_weight": (1.0, 2.0, 3.0)}, "attribute_weight"),
        ({"entity_weight": 2.0}, "need `groups`"),
        ({"mask_steps": (0, -1)}, "mask_steps"),
        ({"phase_split": -0.5}, "phase_split"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ac.AttentionModulation(**kwargs)


def test_one_control_serves_runs_in_a_row_as_fresh_ones(tiny):
    """The resolved groups and the phases are the run's: a second run with other prompts (the
    groups' tokens elsewhere) equals a fresh control's, and the control object is left as it was."""
    make = lambda: ac.AttentionModulation(GROUPS, temperature=0.7, entity_weight=(2.0, 1.0))
    reused = make()
    before = dict(vars(reused))
    second = ["a white sheep behind a red car", PROMPT]
    first = run(tiny, "tiny-sd", [reused])
    again = run(tiny, "tiny-sd", [reused], prompt=second, num_inference_steps=4)
    assert vars(reused).keys() == before.keys() and all(vars(reused)[k] is v for k, v in before.items())
    assert torch.equal(first, run(tiny, "tiny-sd", [make()]))
    assert torch.equal(again, run(tiny, "tiny-sd", [make()], prompt=second, num_inference_steps=4))


def test_groups_need_the_prompt_under_attach(tiny):
    with (
        pytest.raises(ValueError, match="ControlledPipeline"),
        ac.attach(tiny("tiny-sd"), [ac.AttentionModulation(GROUPS)]),
    ):
        pass


# --------------------------------------------------------------------------------- CLI / app


def test_cli_parsing():
    assert CONTROLS["modulation"] is ac.AttentionModulation
    c = parse_control(
        "modulation",
        [
            "groups=red car;white sheep",
            "temperature=0.7",
            "temperature_steps=0,0.3",
            "mask=false",
            "mask_steps=0,10",
            "entity-weight=2,1",
            "attribute_weight=1,2.5",
            "phase_split=0.4",
            "layers=cross,res=16;self,up",
        ],
    )
    assert c.groups == [["red", "car"], ["white", "sheep"]]
    assert (c.temperature, c.temperature_steps, c.mask, c.mask_steps) == (0.7, (0.0, 0.3), False, (0.0, 10.0))
    assert (c.entity_weight, c.attribute_weight, c.phase_split) == ((2.0, 1.0), (1.0, 2.5), 0.4)
    assert c.layers == ["cross,res=16", "self,up"]
    assert parse_control("modulation", ["groups=red car,white sheep"]).groups == [["red", "car"], ["white", "sheep"]]
    assert parse_control("modulation", ["groups=car"]).groups == [["car"]]
    with pytest.raises(ControlArgError, match="temperature"):
        parse_control("modulation", ["temperature=0"])


def test_every_parameter_is_documented():
    params = control_params(ac.AttentionModulation)
    assert [p["name"] for p in params][:3] == ["groups", "temperature", "temperature_steps"]
    assert all(p["doc"] for p in params)


def test_default_layers_follow_the_components(tiny):
    assert ac.AttentionModulation(temperature=0.5).layers == ["self"]
    assert ac.AttentionModulation(GROUPS).layers == ["cross"]
    assert ac.AttentionModulation(GROUPS, temperature=0.5).layers == ["self", "cross"]
    assert ac.AttentionModulation(layers="up").layers == "up"


def test_head_restriction_masks_only_those_heads(tiny):
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # 4 heads
    seen = []

    class Heads(Control):
        default_layers = f"name={layer}"

        def needs_probs(self, call):
            return True

        def probs(self, call, p):
            rows = call.run.layout.rows("cond")
            seen.append(((p[rows, 1] == 0).any().item(), (p[rows, 0] > 0).all().item(), (p[rows, 2:] > 0).all().item()))
            return p

    run(tiny, "tiny-sd", [ac.AttentionModulation(GROUPS, layers=f"name={layer},heads=1"), Heads()])
    assert seen and all(masked and free0 and free_rest for masked, free0, free_rest in seen)
