"""IsolationReposition (IR-Diffusion): exact isolation, reposition, reference rows, regions, errors, CLI."""
import pytest
import torch
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs

import attnctrl as ac
from attnctrl.control import Control
from attnctrl.controls.registry import ControlArgError, parse_control
from attnctrl.regions import box_cells

PROMPTS = ["a cat", "a dog", "a cat and a dog"]
BOXES = "0,0,0.5,1;0.5,0,1,1"  # cat left, dog right (normalised)
REF_BOXES = "0.25,0,0.75,1;0,0.25,1,0.75"
SD_SELF = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"  # 16x16 tokens on tiny-sd
FLUX_LAYER = "transformer_blocks.1.attn"


def run(tiny, name, controls=(), prompts=PROMPTS, **kw):
    return ControlledPipeline(tiny(name))(prompts, seed=0, controls=list(controls), **call_kwargs(name, **kw))


class Probe(Control):
    """Placed after the control under test: keeps the explicit probabilities of one layer."""

    observes_only = True

    def __init__(self, layer):
        super().__init__(layers=f"name={layer}")
        self.seen = []

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.seen.append((call.grid, call.k_image, call.q_image, p.clone()))
        return p


@pytest.mark.parametrize("name, layer", [("tiny-sd", SD_SELF), ("tiny-flux", FLUX_LAYER)])
def test_isolated_subjects_have_exactly_zero_attention_between_them(tiny, name, layer):
    probe = Probe(layer)
    ir = ac.IsolationReposition(["cat", "dog"], references=[0, 1], boxes=BOXES, reference_boxes=REF_BOXES, reposition=False)
    run(tiny, name, [ir, probe])
    assert probe.seen
    for grid, ki, qi, p in probe.seen:
        lk = ki.stop
        cat, dog = (box_cells(b, grid).flatten() for b in [(0, 0, 0.5, 1), (0.5, 0, 1, 1)])
        n_cat = int(box_cells((0.25, 0, 0.75, 1), grid).sum())
        n_dog = int(box_cells((0, 0.25, 1, 0.75), grid).sum())
        assert p.shape[-1] == lk + n_cat + n_dog
        for t in (2, 5) if p.shape[0] == 6 else (2,):  # the target row in every branch
            own = p[t][:, qi][:, :, ki]
            assert (own[:, cat][:, :, dog] == 0).all() and (own[:, dog][:, :, cat] == 0).all()
            shared = p[t][:, qi, lk:]
            assert (shared[:, dog, :n_cat] == 0).all() and (shared[:, cat, n_cat:] == 0).all()
            assert (shared[:, cat, :n_cat].sum(-1) > 0).all() and (shared[:, dog, n_cat:].sum(-1) > 0).all()
            assert torch.allclose(p[t].sum(-1), torch.ones(()), atol=1e-5)
        for r in (0, 1):  # reference rows never see the shared keys
            assert (p[r][..., lk:] == 0).all()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_reference_rows_are_vanilla_and_targets_change(tiny, name):
    stock = run(tiny, name).images
    for ir in (
        ac.IsolationReposition(["cat", "dog"], references=[0, 1], boxes=BOXES, reference_boxes=REF_BOXES),
        ac.IsolationReposition(["cat", "dog"], references=[0, 1], mask_step=1),  # regions from the maps
    ):
        out = run(tiny, name, [ir]).images
        assert (out[:2] - stock[:2]).abs().max().item() <= 1e-5
        assert (out[2] - stock[2]).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_reposition_with_identical_boxes_equals_sharing_in_place(tiny, name):
    a = run(tiny, name, [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=BOXES)]).images
    b = run(tiny, name, [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=BOXES, reposition=False)]).images
    c = run(tiny, name, [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=REF_BOXES)]).images
    assert torch.equal(a, b)
    assert (a[2] - c[2]).abs().max().item() > 1e-5  # moving the reference subject matters


def test_pixel_boxes_and_masks_give_the_same_regions_as_normalised_boxes(tiny):
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    a = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=BOXES)]).images
    b = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes="0,0,32,64;32,0,64,64", reference_masks=masks)]).images
    c = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], masks=masks[:, ::2, ::2], reference_boxes=BOXES)]).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_isolation_only_changes_the_image(tiny):
    stock = run(tiny, "tiny-sd", prompts=["a cat and a dog"]).images
    out = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], boxes=BOXES)], prompts=["a cat and a dog"]).images
    assert (out - stock).abs().max().item() > 1e-5


def test_one_image_that_is_the_reference_is_a_no_op(tiny):
    stock = run(tiny, "tiny-sd", prompts=["a cat"]).images
    out = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat"], [0], boxes="0,0,1,1")], prompts=["a cat"]).images
    assert (out - stock).abs().max().item() <= 1e-5


class Steps(Control):
    """Records the latents after every step (a watcher: no attention hook)."""

    def begin(self, run):
        self.latents = []

    def after_step(self, latents, state):
        self.latents.append(latents.clone())


def test_outside_steps_and_layers_is_stock(tiny):
    plain, ctrl = Steps(), Steps()
    run(tiny, "tiny-sd", [plain])
    ir = ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=REF_BOXES, steps=(2, 3))
    run(tiny, "tiny-sd", [ir, ctrl])
    for i in (0, 1):
        assert (ctrl.latents[i] - plain.latents[i]).abs().max().item() <= 1e-5
    assert (ctrl.latents[2] - plain.latents[2]).abs().max().item() > 1e-5

    class Unchanged(Control):
        default_layers = "name=down_blocks.1.attentions.0.transformer_blocks.0.attn1"

        def qkv(self, call):
            assert call.k.shape[2] == call.k_image.stop and not any(isinstance(k, Control) for k in call.extras)
            self.calls = getattr(self, "calls", 0) + 1

    probe = Unchanged()
    ir = ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=REF_BOXES, layers="up")
    run(tiny, "tiny-sd", [ir, probe])
    assert probe.calls == 3


def test_composes_with_attention_maps(tiny):
    plain = run(tiny, "tiny-sd", [ac.AttentionMaps()])
    ir = ac.IsolationReposition(["cat", "dog"], [0, 1], mask_step=1)
    both = run(tiny, "tiny-sd", [ir, ac.AttentionMaps()])
    for res, m in plain.maps.by_res.items():
        assert torch.allclose(both.maps.by_res[res][:2], m[:2], atol=1e-5)  # reference rows
    assert both.maps.word(2, "dog").shape == (32, 32)


class NoStep(Control):
    def after_step(self, latents, state):
        raise AssertionError("a step ran")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"masks": torch.ones(2, 48, 48)}, "size 48x48"),
        ({"masks": torch.ones(3, 64, 64)}, "shape"),
        ({"boxes": "0,0,0.6,1;0.5,0,1,1"}, "overlap"),
        ({"masks": torch.ones(2, 32, 32)}, "masks overlap"),
        ({"boxes": BOXES, "references": [0, 3]}, "outside the batch"),
        ({"boxes": "0,0,80,64;32,0,64,64"}, "outside"),
    ],
)
def test_bad_input_fails_before_any_step(tiny, kwargs, message):
    kwargs = {"references": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=message):
        run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], **kwargs), NoStep()])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"subjects": []}, "subjects"),
        ({"subjects": ["cat", "dog"], "references": [0]}, "one reference image per subject"),
        ({"subjects": ["cat", "dog"], "boxes": "0,0,1,1"}, "one box per subject"),
        ({"subjects": ["cat"], "boxes": "0,0,1"}, "4 numbers"),
        ({"subjects": ["cat"], "isolation": False}, "nothing to do"),
        ({"subjects": ["cat"], "boxes": "0,0,1,1", "masks": torch.ones(1, 8, 8)}, "not both"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ac.IsolationReposition(**kwargs)


def test_unknown_subject_word_fails_before_any_step(tiny):
    with pytest.raises(ValueError, match="horse"):
        run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "horse"], [0, 1]), NoStep()])


def test_cli_forms():
    c = parse_control("isolation", ["subjects=cat,dog", "references=0,1", "boxes=0,0,32,64;32,0,64,64", "reposition=false"])
    assert isinstance(c, ac.IsolationReposition)
    assert c.boxes == [(0.0, 0.0, 32.0, 64.0), (32.0, 0.0, 64.0, 64.0)] and c.references == [0, 1] and not c.reposition
    with pytest.raises(ControlArgError, match="masks"):
        parse_control("isolation", ["subjects=cat", "masks=x"])
    with pytest.raises(ControlArgError, match="x0,y0,x1,y1"):
        parse_control("isolation", ["subjects=cat,dog", "boxes=0,0,a,1;0,0,1,1"])


def test_moved_flux_keys_carry_the_rotary_embedding_of_their_new_place(tiny):
    from diffusers.models.embeddings import apply_rotary_emb

    from attnctrl.controls.isolation import move_rope, rotate

    pos = tiny("tiny-flux").transformer.pos_embed
    ids = torch.zeros(40, 3)
    ids[8:, 1] = torch.arange(32) // 8
    ids[8:, 2] = torch.arange(32) % 8
    cos, sin = pos(ids)
    k = torch.randn(2, 2, 40, cos.shape[-1])
    assert torch.allclose(rotate(k, cos, sin), apply_rotary_emb(k, (cos, sin), sequence_dim=2), atol=1e-6)
    src = torch.tensor([[9, 10, 20], [30, 31, 39]])
    dst = torch.tensor([[12, 13, 25], [8, 9, 10]])
    raw = torch.stack([k[b, :, src[b]] for b in range(2)])
    rotated_src = torch.stack([rotate(raw[b], cos[src[b]], sin[src[b]]) for b in range(2)])
    rotated_dst = torch.stack([rotate(raw[b], cos[dst[b]], sin[dst[b]]) for b in range(2)])
    assert torch.allclose(move_rope(rotated_src, (cos, sin), src, dst), rotated_dst, atol=1e-5)
