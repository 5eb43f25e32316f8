"""Composition rules: `build_plan` refuses, before step 1, two controls on one layer whose effects
conflict (their order would silently change meaning), and keeps every composition the suite uses."""

import re

import pytest
import torch

import attnctrl as ac
from attnctrl.control import EFFECTS, Control
from attnctrl.pipelines import ControlledPipeline
from attnctrl.plan import CompositionError, build_plan
from conftest import call_kwargs, processors_of

PROMPTS = ["a cat and a dog", "a cat and a dog on grass"]


def plan_of(tiny, name, controls):
    cp = ControlledPipeline(tiny(name))
    return build_plan(controls, cp.layers(), cp.default_grid())


def self_layers(tiny, name):
    return [layer.name for layer in ControlledPipeline(tiny(name)).layers() if layer.has_part("self")]


def cross_layers(tiny, name):
    return [layer.name for layer in ControlledPipeline(tiny(name)).layers() if layer.kind == "cross"]


class Probe(Control):
    """A test probe with every attention hook (as the suite's spies): it reads, never edits."""

    def qkv(self, call):
        return None

    def bias(self, call):
        return None

    def probs(self, call, p):
        return p

    def out(self, call, o):
        return o


# ---- the effects ---------------------------------------------------------------------------------------
def test_effects_are_derived_from_the_hooks_and_declared_where_the_hooks_cannot_say():
    eff = lambda c: c.layer_effects()
    assert eff(ac.AttentionMaps()) == {"reads_probs"}  # probs + observes_only
    assert eff(ac.PAG("mid")) == {"edits_out", "adds_branch"}  # out, replaced_rows, branches
    assert eff(ac.AttendExcite(tokens=["cat"])) == {"reads_probs"}  # declared: its probs only reads
    assert "replaces_kv" in eff(ac.MutualSelfAttention()) and "extends_kv" in eff(ac.SharedAttention())
    assert "edits_values" in eff(ac.StructuredGuidance(["a cat"]))
    assert eff(ac.AttentionModulation(temperature=0.5)) == {"edits_scale", "bias"}
    assert "extends_kv" in eff(ac.IsolationReposition(["cat", "dog"], [0, 1]))
    assert "extends_kv" not in eff(ac.IsolationReposition(["cat", "dog"]))  # isolation only: no sharing
    assert eff(Probe()) == {"edits_qkv", "bias", "edits_probs", "edits_out"}
    assert all(e in EFFECTS for c in (ac.SharedAttention(), Probe()) for e in eff(c))


def test_an_unknown_effect_fails_when_the_class_is_defined():
    with pytest.raises(ValueError, match="unknown effect"):

        class Typo(Control):
            effects = frozenset({"replace_kv"})


# ---- refusals ------------------------------------------------------------------------------------------
REFUSED = {
    "shared+mutual": lambda: [ac.SharedAttention(), ac.MutualSelfAttention(start_layer=0)],
    "mutual+shared": lambda: [ac.MutualSelfAttention(start_layer=0), ac.SharedAttention()],
    "mutual+isolation-refs": lambda: [
        ac.MutualSelfAttention(start_layer=0),
        ac.IsolationReposition(["cat", "dog"], [0, 1], start_layer=0),
    ],
    "shared+isolation-refs": lambda: [ac.SharedAttention(), ac.IsolationReposition(["cat", "dog"], [0, 1])],
    "shared+shared": lambda: [ac.SharedAttention(reference=0), ac.SharedAttention(reference=1)],
    "structured+structured": lambda: [ac.StructuredGuidance(["a cat"]), ac.StructuredGuidance(["a dog"])],
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_on_one_layer(tiny, case):
    controls = REFUSED[case]()
    a, b = (type(c).__name__ for c in controls)
    with pytest.raises(CompositionError, match=rf"{a} and {b} cannot share layer ") as err:
        plan_of(tiny, "tiny-sd", controls)
    layer = re.search(r"cannot share layer (\S+):", str(err.value)).group(1)
    assert layer in self_layers(tiny, "tiny-sd") + cross_layers(tiny, "tiny-sd")
    assert "layers=" in str(err.value)  # says how to fix it


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_refusal_comes_before_any_denoiser_call_and_leaves_the_processors(tiny, name):
    pipe = tiny(name)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    before = processors_of(pipe)
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(CompositionError, match="SharedAttention and MutualSelfAttention cannot share layer"):
            ControlledPipeline(pipe)(
                PROMPTS,
                seed=0,
                controls=[ac.SharedAttention(), ac.MutualSelfAttention(layers="self")],
                **call_kwargs(name),
            )
    finally:
        handle.remove()
    assert calls == []
    after = processors_of(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# ---- disjoint selectors ------------------------------------------------------------------------------------
def test_disjoint_layers_make_the_same_pairs_allowed(tiny):
    first, second = self_layers(tiny, "tiny-sd")[:2]
    c1, c2 = cross_layers(tiny, "tiny-sd")[:2]
    pairs = [
        [ac.SharedAttention(layers=f"name={first}"), ac.MutualSelfAttention(layers=f"name={second}")],
        [
            ac.MutualSelfAttention(layers=f"name={first}"),
            ac.IsolationReposition(["cat", "dog"], [0, 1], layers=f"name={second}", start_layer=0),
        ],
        [ac.SharedAttention(layers=f"name={first}"), ac.SharedAttention(reference=1, layers=f"name={second}")],
        [ac.StructuredGuidance(["a cat"], layers=f"name={c1}"), ac.StructuredGuidance(["a dog"], layers=f"name={c2}")],
    ]
    for controls in pairs:
        plan = plan_of(tiny, "tiny-sd", controls)
        assert all(len(entries) == 1 for entries in plan.values())
    # disjoint self layers; both also read the maps of one cross-attention layer, where neither
    # replaces or extends keys/values (UNet cross-attention has no self part): allowed there too
    plan = plan_of(
        tiny,
        "tiny-sd",
        [
            ac.MutualSelfAttention(mask_tokens=["cat"], layers=f"name={first}"),
            ac.IsolationReposition(["cat", "dog"], [0, 1], layers=f"name={second}", start_layer=0),
        ],
    )
    assert any(len(entries) == 2 for entries in plan.values())
    # and the pipeline runs them
    out = ControlledPipeline(tiny("tiny-sd"))(PROMPTS, seed=0, controls=pairs[0], **call_kwargs("tiny-sd"))
    assert torch.isfinite(out.images).all()


# ---- what stays allowed ------------------------------------------------------------------------------------
ALLOWED = {
    # test_shared: SharedAttention + AttentionMaps + PAG, and AttentionMaps + PAG
    "shared+maps+pag": lambda: [ac.SharedAttention(), ac.AttentionMaps(), ac.PAG("mid")],
    "maps+pag": lambda: [ac.AttentionMaps(), ac.PAG("mid")],
    # test_perturbation / test_app: PAG + AttentionMaps
    "pag+maps": lambda: [ac.PAG("self"), ac.AttentionMaps()],
    # test_structured, test_mutual, test_isolation: each with AttentionMaps
    "structured+maps": lambda: [ac.StructuredGuidance(["a cat"]), ac.AttentionMaps()],
    "mutual+maps": lambda: [ac.MutualSelfAttention(start_step=0, start_layer=2), ac.AttentionMaps()],
    "isolation+maps": lambda: [ac.IsolationReposition(["cat", "dog"], [0, 1], mask_step=1), ac.AttentionMaps()],
    # the loss controls with maps (test_attention_losses: AStar)
    "astar+maps": lambda: [ac.AStar(tokens=["cat", "dog"]), ac.AttentionMaps()],
    "excite+maps": lambda: [ac.AttendExcite(tokens=["cat"]), ac.AttentionMaps()],
    "conform+maps": lambda: [ac.Conform(groups=[["cat"], ["dog"]]), ac.AttentionMaps()],
    # AttentionModulation with others: τ / bias do not change whose keys or values a layer reads
    "modulation+maps+pag": lambda: [ac.AttentionModulation(temperature=0.5), ac.AttentionMaps(), ac.PAG("mid")],
    "modulation+shared": lambda: [ac.AttentionModulation(temperature=0.5), ac.SharedAttention()],
    "mutual+modulation": lambda: [ac.MutualSelfAttention(start_layer=0), ac.AttentionModulation(temperature=0.5)],
    "modulation+structured": lambda: [ac.AttentionModulation(groups="cat;dog"), ac.StructuredGuidance(["a cat"])],
    # one key/value source with PAG: PAG's perturbed rows read only the layer's own keys
    "shared+pag": lambda: [ac.SharedAttention(), ac.PAG("mid")],
    "mutual+pag": lambda: [ac.MutualSelfAttention(start_layer=0), ac.PAG("mid")],
    # isolation without references only masks: it shares no keys/values
    "mutual+isolation-only": lambda: [ac.MutualSelfAttention(start_layer=0), ac.IsolationReposition(["cat", "dog"])],
    # the suite's probes (every hook, reading) before and after each control
    "probe+shared+probe": lambda: [Probe(), ac.SharedAttention(), Probe()],
    "mutual+probe": lambda: [ac.MutualSelfAttention(start_layer=0), Probe()],
    "isolation+probe": lambda: [ac.IsolationReposition(["cat", "dog"], [0, 1]), Probe()],
    "probe+structured": lambda: [Probe(layers="cross"), ac.StructuredGuidance(["a cat"])],
    "heads+probe": lambda: [ac.HeadPerturbation("self,heads=0", softness=0.4), Probe()],
    "modulation+probe": lambda: [ac.AttentionModulation(temperature=0.5), Probe()],
}


# on the SD UNet these pairs sit on different layers (self / cross), on joint layers they share one
APART_ON_SD = {"maps+pag", "pag+maps", "mutual+maps"}


@pytest.mark.parametrize("case", sorted(ALLOWED))
def test_allowed_on_one_layer(tiny, case):
    controls = ALLOWED[case]()
    plan = plan_of(tiny, "tiny-sd", controls)
    if case not in APART_ON_SD:  # they do share a layer
        assert max(len(entries) for entries in plan.values()) >= 2


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_allowed_on_joint_layers(tiny, name):
    for controls in (
        [ac.SharedAttention(), ac.AttentionMaps(), ac.PAG("self")],
        [ac.MutualSelfAttention(layers="self"), ac.AttentionModulation(temperature=0.5)],
    ):
        plan_of(tiny, name, controls)


def test_exclusive_with_still_refuses_by_name(tiny):
    class Solo(Probe):
        name = "solo"
        exclusive_with = ("maps",)

    with pytest.raises(CompositionError, match="Solo and AttentionMaps cannot share layer .*exclusive_with"):
        plan_of(tiny, "tiny-sd", [Solo(layers="cross"), ac.AttentionMaps()])
