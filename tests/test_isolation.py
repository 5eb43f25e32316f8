"""IsolationReposition (IR-Diffusion): exact isolation, reposition, reference rows, regions, errors, CLI.

Besides end-to-end runs on the tiny models, most properties are pinned on one hand-made layer call
(`attend` over an `AttentionCall` built here) against the formula written out in the test.
"""

import pytest
import torch
import torch.nn.functional as F

import attnctrl as ac
from attnctrl.attention import AttentionCall, active_chain, attend
from attnctrl.attention_block import ProbsBlock
from attnctrl.control import Control
from attnctrl.controls.isolation import SDXL_START_LAYER, default_start_layer, dropout_keep
from attnctrl.controls.registry import ControlArgError, parse_control
from attnctrl.layers import LayerInfo
from attnctrl.pipelines import ControlledPipeline
from attnctrl.pipelines.facts import set_run_facts
from attnctrl.plan import build_plan
from attnctrl.regions import box_cells, regions_from_maps, relocate
from attnctrl.state import BatchLayout, RunContext, StepState
from conftest import _cached, call_kwargs

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
    probe = Probe(layer)  # a probability reader: the layer runs one SDPA for all rows (shared keys −∞ on references)
    ir = ac.IsolationReposition(
        ["cat", "dog"],
        references=[0, 1],
        boxes=BOXES,
        reference_boxes=REF_BOXES,
        reposition=False,
        dropout=0.0,
        start_layer=0,
    )
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
    # Alone on its layers the control computes the reference rows with the stock SDPA call on their own
    # keys (no mask, no shared keys), so they are bit-identical to the stock run on every CPU kernel
    # (AVX2 and AVX-512 alike): same batch, same kernel path, same numbers. A reference row that read
    # a target's keys would differ (see the mutation table in the report).
    stock = run(tiny, name).images
    for ir in (
        ac.IsolationReposition(
            ["cat", "dog"], references=[0, 1], boxes=BOXES, reference_boxes=REF_BOXES, start_layer=0
        ),
        ac.IsolationReposition(["cat", "dog"], references=[0, 1], mask_step=1),  # regions from the maps, default layers
    ):
        out = run(tiny, name, [ir]).images
        assert torch.equal(out[:2], stock[:2])
        assert (out[2] - stock[2]).abs().max().item() > 1e-4


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_reposition_with_identical_boxes_equals_sharing_in_place(tiny, name):
    a = run(tiny, name, [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=BOXES)]).images
    b = run(
        tiny,
        name,
        [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=BOXES, reposition=False)],
    ).images
    c = run(tiny, name, [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=REF_BOXES)]).images
    assert torch.equal(a, b)
    assert (a[2] - c[2]).abs().max().item() > 1e-5  # moving the reference subject matters


def test_pixel_boxes_and_masks_give_the_same_regions_as_normalised_boxes(tiny):
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1
    masks[1, :, 32:] = 1
    a = run(
        tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=BOXES)]
    ).images
    b = run(
        tiny,
        "tiny-sd",
        [ac.IsolationReposition(["cat", "dog"], [0, 1], boxes="0,0,32,64;32,0,64,64", reference_masks=masks)],
    ).images
    c = run(
        tiny,
        "tiny-sd",
        [ac.IsolationReposition(["cat", "dog"], [0, 1], masks=masks[:, ::2, ::2], reference_boxes=BOXES)],
    ).images
    assert torch.equal(a, b) and torch.equal(a, c)


def test_isolation_only_changes_the_image(tiny):
    stock = run(tiny, "tiny-sd", prompts=["a cat and a dog"]).images
    out = run(
        tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], boxes=BOXES)], prompts=["a cat and a dog"]
    ).images
    assert (out - stock).abs().max().item() > 1e-5


def test_one_image_that_is_the_reference_is_a_no_op(tiny):
    stock = run(tiny, "tiny-sd", prompts=["a cat"]).images
    out = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat"], [0], boxes="0,0,1,1")], prompts=["a cat"]).images
    assert (out - stock).abs().max().item() <= 1e-5


class Steps(Control):
    """Records the latents after every step (a watcher: no attention hook)."""

    def begin(self, run):
        self.latents = []

    def after_step(self, run, latents):
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
    def after_step(self, run, latents):
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
        ({"boxes": BOXES, "start_layer": 7}, "start_layer=7"),  # tiny-sd has 7 self-attention layers
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
        ({"subjects": ["cat"], "references": [0], "mutual_cross": 1.5}, "mutual_cross"),
        ({"subjects": ["cat"], "references": [0], "dropout": 1.0}, "dropout"),
        ({"subjects": ["cat"], "references": [0], "start_layer": -1}, "start_layer"),
        ({"subjects": ["cat"], "references": [0], "seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ac.IsolationReposition(**kwargs)


def test_unknown_subject_word_fails_before_any_step(tiny):
    with pytest.raises(ValueError, match="horse"):
        run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "horse"], [0, 1]), NoStep()])


def test_cli_forms():
    c = parse_control(
        "isolation", ["subjects=cat,dog", "references=0,1", "boxes=0,0,32,64;32,0,64,64", "reposition=false"]
    )
    assert isinstance(c, ac.IsolationReposition)
    assert c.boxes == [(0.0, 0.0, 32.0, 64.0), (32.0, 0.0, 64.0, 64.0)] and c.references == [0, 1] and not c.reposition
    d = parse_control(
        "isolation", ["subjects=cat", "references=0", "mutual-cross=0.5", "dropout=0", "seed=3", "start-layer=2"]
    )
    assert (d.mutual_cross, d.dropout, d.seed, d.start_layer) == (0.5, 0.0, 3, 2)
    with pytest.raises(ControlArgError, match="masks"):
        parse_control("isolation", ["subjects=cat", "masks=x"])
    with pytest.raises(ControlArgError, match="x0,y0,x1,y1"):
        parse_control("isolation", ["subjects=cat,dog", "boxes=0,0,a,1;0,0,1,1"])


def test_moved_flux_keys_carry_the_rotary_embedding_of_their_new_place(tiny):
    from diffusers.models.embeddings import apply_rotary_emb

    from attnctrl.controls.isolation import move_rope
    from attnctrl.rope import rotate

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


# ---- one hand-made layer call ------------------------------------------------------------------
GRID = (4, 4)
CAT, DOG = (0, 0, 0.5, 1), (0.5, 0, 1, 1)  # target boxes: left / right half
CAT_REF, DOG_REF = (0.25, 0, 0.75, 1), (0, 0.25, 1, 0.75)  # columns 1-2 / rows 1-2 of the references
DOWN = LayerInfo("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", "down", 0, 1, 2)
UP = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 1, 1, 2)
UP_CROSS = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "cross", "up", 1, 1, 2)
LAYERS = [DOWN, UP, UP_CROSS]


def hand_context(images=3, step=0, num_steps=10):
    """A run of `images` images at `step` on GRID, its denoiser tiny-sd's UNet (which has the layers above:
    the control reads their `LayerInfo`s from it)."""
    return RunContext(
        family="sd",
        layout=BatchLayout.build(images, True),
        grid=GRID,
        state=StepState(step, 999.0, num_steps),
        denoiser=_cached("tiny-sd").unet,
    )


def hand_run(ir, step=0, layers=LAYERS, images=3):
    run = hand_context(images, step)
    run.plan = build_plan([ir], layers, GRID)
    ir.begin(run)
    return run


def hand_call(run, layer, seed=0, text=7, dim=8):
    g = torch.Generator().manual_seed(seed)
    B, H, L = run.layout.size, layer.heads, GRID[0] * GRID[1]
    q, k, v = (torch.randn(B, H, L if i == 0 or layer.kind == "self" else text, dim, generator=g) for i in range(3))
    cross = layer.kind == "cross"
    return AttentionCall(
        layer=layer,
        run=run,
        q=q,
        k=k,
        v=v,
        q_image=slice(0, L),
        k_image=slice(0, 0) if cross else slice(0, L),
        k_text=slice(0, text) if cross else None,
        grid=GRID,
        scale=dim**-0.5,
    )


def layer_out(run, call):
    return attend(call, active_chain(run, call.layer.name))


def ir_hand(**kw):
    args = dict(boxes=[CAT, DOG], reference_boxes=[CAT_REF, DOG_REF], dropout=0.0)
    return ac.IsolationReposition(["cat", "dog"], [0, 1], **{**args, **kw})


def expected_target(call, row, ref_rows, keys, allowed, isolate=True):
    """softmax(q·[K_own; K_shared]ᵀ·scale + M)·[V_own; V_shared] written out, in float64.

    keys[i]: reference i's key cells read by subject i (source cells), allowed[i]: bool (L,) queries of
    the target that may read them; the isolation mask forbids cat↔dog between the target's own cells."""
    q, k, v = (x[row].double() for x in (call.q, call.k, call.v))
    cat, dog = (box_cells(b, GRID).flatten() for b in (CAT, DOG))
    ks, vs, masks = [k], [v], []
    own = torch.zeros(q.shape[1], k.shape[1], dtype=torch.float64)
    if isolate:
        own[cat[:, None] & dog[None, :]] = float("-inf")
        own[dog[:, None] & cat[None, :]] = float("-inf")
    masks.append(own)
    for i, (r, src) in enumerate(zip(ref_rows, keys)):
        ks.append(call.k[r][:, src].double())
        vs.append(call.v[r][:, src].double())
        m = torch.full((q.shape[1], len(src)), float("-inf"), dtype=torch.float64)
        m[allowed[i]] = 0.0
        masks.append(m)
    logits = q @ torch.cat(ks, 1).transpose(-1, -2) * call.scale + torch.cat(masks, 1)
    return (logits.softmax(-1) @ torch.cat(vs, 1)).float()


def nearest_src(ref_box_cells, target_box_cells, w=4):
    """Source cell of every target-box cell: F.interpolate(mode="nearest") of the reference crop's flat indices."""
    ys, xs = ref_box_cells.nonzero(as_tuple=True)
    ty, tx = target_box_cells.nonzero(as_tuple=True)
    flat = torch.arange(16.0).view(1, 1, 4, 4)[:, :, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    size = (int(ty.max() - ty.min() + 1), int(tx.max() - tx.min() + 1))
    return F.interpolate(flat, size=size, mode="nearest").flatten().long()


@pytest.mark.parametrize("reposition", [False, True])
def test_one_layer_call_by_value(reposition):
    ir = ir_hand(reposition=reposition, mutual_cross=0.0, start_layer=0)
    run = hand_run(ir)
    call = hand_call(run, UP)
    vanilla = F.scaled_dot_product_attention(call.q, call.k, call.v)
    o = layer_out(run, call)
    # reference rows (0, 1, 3, 4): the stock SDPA call on their own keys, bit for bit
    assert torch.equal(o[[0, 1, 3, 4]], vanilla[[0, 1, 3, 4]])
    cat, dog = (box_cells(b, GRID) for b in (CAT, DOG))
    cat_ref, dog_ref = (box_cells(b, GRID) for b in (CAT_REF, DOG_REF))
    if reposition:  # each reference subject resized into the target box
        keys = [nearest_src(cat_ref, cat), nearest_src(dog_ref, dog)]
        # pinned: cat 4x2 → 4x2 (columns 1, 2); dog rows 1-2 → 4 rows [1, 1, 2, 2], columns 0-3 → 2 [0, 2]
        assert keys[0].tolist() == [1, 2, 5, 6, 9, 10, 13, 14]
        assert keys[1].tolist() == [4, 6, 4, 6, 8, 10, 8, 10]
    else:
        keys = [cat_ref.flatten().nonzero().flatten(), dog_ref.flatten().nonzero().flatten()]
    allowed = [cat.flatten(), dog.flatten()]
    for row, refs in ((2, [0, 1]), (5, [3, 4])):  # the target row of each branch reads its own branch's references
        want = expected_target(call, row, refs, keys, allowed)
        assert torch.allclose(o[row], want, atol=1e-6), (o[row] - want).abs().max()


def test_the_single_sdpa_path_gives_the_same_attention():
    """With another control's mask on the layer all rows share one SDPA; the result is the same up to rounding."""

    class ZeroBias(Control):
        def bias(self, call):
            return torch.zeros(())

    ir = ir_hand(mutual_cross=0.0, start_layer=0)
    run = hand_run(ir)
    alone = layer_out(run, hand_call(run, UP))
    run = hand_context()
    other = ZeroBias(layers="self")
    run.plan = build_plan([ir, other], LAYERS, GRID)
    ir.begin(run)
    call = hand_call(run, UP)
    joint = layer_out(run, call)
    assert call.k.shape[2] == 16 + 8 + 8  # the shared keys went into the layer's own call
    # float32 rounding of a softmax over 32 keys: ~1e-7; a reference row reading a shared key moves by ~1e-1
    assert torch.allclose(joint, alone, atol=1e-6)


def test_mutual_cross_attention_by_value():
    lam = 0.9
    ir = ir_hand(mutual_cross=lam)
    run = hand_run(ir)
    call = hand_call(run, UP_CROSS)
    vanilla = F.scaled_dot_product_attention(call.q, call.k, call.v)
    o = layer_out(run, call)
    assert torch.equal(o[[0, 1, 3, 4]], vanilla[[0, 1, 3, 4]])  # reference rows untouched
    cat, dog = (box_cells(b, GRID).flatten() for b in (CAT, DOG))
    for row, (r_cat, r_dog) in ((2, (0, 1)), (5, (3, 4))):
        q = call.q[row].double()
        read = lambda r, q=q: ((q @ call.k[r].double().transpose(-1, -2)) * call.scale).softmax(-1) @ call.v[r].double()
        want = vanilla[row].double().clone()
        want[:, cat] = (1 - lam) * want[:, cat] + lam * read(r_cat)[
            :, cat
        ]  # a cat query reads the cat reference's text
        want[:, dog] = (1 - lam) * want[:, dog] + lam * read(r_dog)[:, dog]
        assert torch.allclose(o[row].double(), want, atol=1e-6)
    # λ = 0 is the vanilla layer
    ir0 = ir_hand(mutual_cross=0.0)
    run0 = hand_run(ir0)
    assert UP_CROSS.name not in run0.plan


def test_mutual_cross_attention_averages_overlapping_subjects():
    ir = ir_hand(mutual_cross=0.5, isolation=False, boxes=[(0, 0, 0.75, 1), (0.25, 0, 1, 1)])
    run = hand_run(ir)
    call = hand_call(run, UP_CROSS)
    vanilla = F.scaled_dot_product_attention(call.q, call.k, call.v)
    o = layer_out(run, call)
    both = (box_cells((0, 0, 0.75, 1), GRID) & box_cells((0.25, 0, 1, 1), GRID)).flatten()
    q = call.q[2].double()
    read = lambda r: ((q @ call.k[r].double().transpose(-1, -2)) * call.scale).softmax(-1) @ call.v[r].double()
    mixed = (read(0) + read(1)) / 2  # Σ m_i O_i / Σ m_i with both masks on
    want = 0.5 * vanilla[2].double() + 0.5 * mixed
    assert torch.allclose(o[2][:, both].double(), want[:, both], atol=1e-6)


def test_dropout_thins_the_rows_that_read_each_reference_per_step():
    ir = ir_hand(dropout=0.5, seed=7, mutual_cross=0.0, start_layer=0)
    probe = Probe(UP.name)
    run = hand_context(step=3)
    run.plan = build_plan([ir, probe], LAYERS, GRID)
    ir.begin(run)
    seen = {}
    for step in (3, 4):
        run.state = StepState(step, 999.0, 10)
        probe.seen.clear()
        layer_out(run, hand_call(run, UP))
        p = probe.seen[0][3]
        keep = dropout_keep(7, step, GRID, 2, 0.5)
        for i, (box, cols) in enumerate(((CAT, slice(16, 24)), (DOG, slice(24, 32)))):
            region = box_cells(box, GRID).flatten()
            want = region & keep[i] if (region & keep[i]).any() else region
            for row in (2, 5):  # the same cells in both branches
                reads = p[row][:, :, cols].sum(-1) > 0  # (heads, queries)
                assert torch.equal(reads, want[None].expand_as(reads))
            seen[step, i] = want
        assert not (p[[0, 1, 3, 4]][..., 16:] > 0).any()  # references never read shared keys
    assert any(not torch.equal(seen[3, i], seen[4, i]) for i in (0, 1))  # redrawn every step
    # the draws: deterministic, per (seed, step, grid), about 1 − p of the cells kept
    assert torch.equal(dropout_keep(7, 3, GRID, 2, 0.5), dropout_keep(7, 3, GRID, 2, 0.5))
    assert not torch.equal(dropout_keep(7, 3, (32, 32), 1, 0.5), dropout_keep(8, 3, (32, 32), 1, 0.5))
    assert abs(dropout_keep(0, 0, (64, 64), 1, 0.5).float().mean().item() - 0.5) < 0.05
    assert (
        ac.IsolationReposition(["cat"], [0]).dropout == 0.5 and ac.IsolationReposition(["cat"], [0]).mutual_cross == 0.9
    )


def test_dropout_never_empties_a_region():
    one = (0, 0, 0.25, 0.25)  # a single cell: cell 0
    step = next(s for s in range(100) if not dropout_keep(0, s, GRID, 1, 0.5)[0, 0])
    ir = ac.IsolationReposition(
        ["cat"], [0], boxes=[one], reference_boxes=[one], dropout=0.5, mutual_cross=0.0, start_layer=0
    )
    probe = Probe(UP.name)
    run = hand_context(images=2, step=step, num_steps=200)
    run.plan = build_plan([ir, probe], LAYERS, GRID)
    ir.begin(run)
    layer_out(run, hand_call(run, UP))
    p = probe.seen[0][3]
    assert p.shape[-1] == 17 and (p[[1, 3]][:, :, 0, 16] > 0).all()  # the dropped cell still reads the reference


def test_dropout_runs_are_reproducible_and_seeded(tiny):
    stock = run(tiny, "tiny-sd").images
    kw = dict(boxes=BOXES, reference_boxes=REF_BOXES, start_layer=0)
    a = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], seed=1, **kw)]).images
    b = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], seed=1, **kw)]).images
    c = run(tiny, "tiny-sd", [ac.IsolationReposition(["cat", "dog"], [0, 1], seed=2, **kw)]).images
    assert torch.equal(a, b) and torch.equal(a[:2], stock[:2])
    assert (a[2] - c[2]).abs().max().item() > 1e-5


# ---- which layers share ------------------------------------------------------------------------
def unet_layers(blocks):
    """Self-attention LayerInfos from [(prefix, place, factor, count)] in forward order."""
    out = []
    for prefix, place, factor, attentions, per in blocks:
        for a in range(attentions):
            for t in range(per):
                out.append(
                    LayerInfo(f"{prefix}.attentions.{a}.transformer_blocks.{t}.attn1", "self", place, 0, factor, 2)
                )
    return out


def test_sharing_starts_in_the_decoder():
    sdxl = unet_layers(
        [
            ("down_blocks.1", "down", 2, 2, 2),
            ("down_blocks.2", "down", 4, 2, 10),
            ("mid_block", "mid", 4, 1, 10),
            ("up_blocks.0", "up", 4, 3, 10),
            ("up_blocks.1", "up", 2, 3, 2),
        ]
    )
    assert len(sdxl) == 70 and default_start_layer(sdxl) == SDXL_START_LAYER == 36
    assert sdxl[36].name == "up_blocks.0.attentions.0.transformer_blocks.2.attn1"  # the reference code's start_layer=36
    sd = unet_layers(
        [
            ("down_blocks.0", "down", 1, 2, 1),
            ("down_blocks.1", "down", 2, 2, 1),
            ("down_blocks.2", "down", 4, 2, 1),
            ("mid_block", "mid", 8, 1, 1),
            ("up_blocks.1", "up", 4, 3, 1),
            ("up_blocks.2", "up", 2, 3, 1),
            ("up_blocks.3", "up", 1, 3, 1),
        ]
    )
    assert len(sd) == 16 and default_start_layer(sd) == 7 and sd[7].name.startswith("up_blocks.1.")
    dit = [LayerInfo(f"transformer_blocks.{i}.attn", "joint", "blocks", i, 1, 2) for i in range(24)]
    assert default_start_layer(dit) == 12
    # on one layer call: the encoder layer isolates but shares nothing, the decoder layer shares
    ir = ir_hand(mutual_cross=0.0)
    probe_down, probe_up = Probe(DOWN.name), Probe(UP.name)
    run = hand_context()
    run.plan = build_plan([ir, probe_down, probe_up], LAYERS, GRID)
    ir.begin(run)
    cat, dog = (box_cells(b, GRID).flatten() for b in (CAT, DOG))
    layer_out(run, hand_call(run, DOWN))
    layer_out(run, hand_call(run, UP))
    p_down, p_up = probe_down.seen[0][3], probe_up.seen[0][3]
    assert p_down.shape[-1] == 16 and p_up.shape[-1] == 32
    for p in (p_down, p_up):
        own = p[2][..., :16]
        assert (own[:, cat][:, :, dog] == 0).all() and (own[:, dog][:, :, cat] == 0).all()
        assert (own[:, cat][:, :, cat] > 0).all()


def test_default_layers_on_the_tiny_models(tiny):
    """tiny-sd shares in its up blocks only; tiny-flux in its second half (single blocks)."""
    for name, shared, not_shared in (
        (
            "tiny-sd",
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
            "mid_block.attentions.0.transformer_blocks.0.attn1",
        ),
        ("tiny-flux", "single_transformer_blocks.0.attn", "transformer_blocks.1.attn"),
    ):
        probes = [Probe(shared), Probe(not_shared)]
        ir = ac.IsolationReposition(["cat", "dog"], [0, 1], boxes=BOXES, reference_boxes=REF_BOXES, dropout=0.0)
        run(tiny, name, [ir, *probes])
        (grid, ki, _, p_shared), (_, ki2, _, p_not) = probes[0].seen[-1], probes[1].seen[-1]
        n = int(box_cells((0.25, 0, 0.75, 1), grid).sum() + box_cells((0, 0.25, 1, 0.75), grid).sum())
        assert p_shared.shape[-1] == ki.stop + n and p_not.shape[-1] == ki2.stop


# ---- reposition's index map ---------------------------------------------------------------------
def test_relocate_is_nearest_interpolation_of_the_reference_crop():
    h, w = 10, 12
    ref = torch.zeros(h, w, dtype=torch.bool)
    ref[2:5, 3:5] = True  # 3 x 2 box ...
    ref[3, 3] = False  # ... with a hole
    target = torch.zeros(h, w, dtype=torch.bool)
    target[4:9, 6:11] = True  # 5 x 5
    src, dst = relocate(ref, target)
    # the reference grid resized by F.interpolate(mode="nearest") into the target box, cell by cell
    values = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    moved = F.interpolate(values[:, :, 2:5, 3:5], size=(5, 5), mode="nearest")[0, 0].long()
    on = ref.flatten()[moved]
    want_dst = (torch.arange(4, 9)[:, None] * w + torch.arange(6, 11)[None, :])[on]
    assert torch.equal(dst, want_dst) and torch.equal(src, moved[on])
    # pinned rows 3 → 5: [0, 0, 1, 1, 2]; columns 2 → 5: [0, 0, 0, 1, 1] (ceil would give [0, 1, 1, 2, ...])
    rows, cols = moved // w - 2, moved % w - 3
    assert rows[:, 0].tolist() == [0, 0, 1, 1, 2] and cols[0].tolist() == [0, 0, 0, 1, 1]
    assert len(src) == 25 - 6  # the hole (row 1 of 3, column 0 of 2) covers 2 x 3 target cells


def test_relocate_matches_interpolate_where_exact_floor_does_not():
    # 26 → 22 cells: F.interpolate's float32 scale rounds index 11 to 12, exact floor(11·26/22) = 13 — we follow F.interpolate
    ref = torch.zeros(26, 26, dtype=torch.bool)
    ref[:, 0] = True
    target = torch.zeros(26, 26, dtype=torch.bool)
    target[:22, 0] = True
    src, _ = relocate(ref, target)
    want = F.interpolate(torch.arange(26.0).view(1, 1, 26, 1), size=(22, 1), mode="nearest").flatten().long()
    assert torch.equal(src // 26, want)
    assert not torch.equal(want, torch.div(torch.arange(22) * 26, 22, rounding_mode="floor"))


# ---- regions from attention --------------------------------------------------------------------
def test_regions_from_maps_by_value():
    cat = torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 0.8, 0.5, 0.0], [0.9, 0.7, 0.6, 0.0], [0.0, 0.0, 0.0, 0.0]])
    dog = torch.tensor([[0.0, 0.0, 0.3, 1.0], [0.0, 0.9, 0.5, 1.0], [0.0, 0.7, 0.9, 1.0], [0.0, 0.0, 0.2, 0.0]])
    maps = torch.stack([cat, dog])[None] * 4 + 2  # min-max normalisation undoes scale and offset
    got = regions_from_maps([maps], (4, 4), 0.5, torch.tensor([[True, True]]))[0]
    want_cat = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    ).float()  # 0.5: not above; 0.7 = 0.7: tie
    want_dog = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]]).float()
    assert torch.equal(got[0], want_cat) and torch.equal(got[1], want_dog)
    only_cat = regions_from_maps([maps], (4, 4), 0.5, torch.tensor([[True, False]]))[0]
    assert torch.equal(only_cat[1], torch.zeros(4, 4))
    assert torch.equal(only_cat[0], (cat > 0.5).float())  # alone, no stronger subject takes a cell


def test_the_map_reader_gives_the_thresholded_regions(tiny):
    run_ = RunContext(
        family="sd", layout=BatchLayout.build(3, True), grid=GRID, prompts=PROMPTS, state=StepState(0, 999.0, 3)
    )
    pipe = ControlledPipeline(tiny("tiny-sd"))
    set_run_facts(run_, pipe.pipe, pipe.denoiser, pipe.adapter)  # the tokenizers: subject words -> indices
    ir = ac.IsolationReposition(["cat", "dog"], [0, 1], mask_step=1)
    run_.plan = build_plan([ir], LAYERS, GRID)
    ir.begin(run_)
    call = hand_call(run_, UP_CROSS, text=77)
    cat = (
        torch.tensor([[0, 2, 4, 4], [0, 3, 4, 1], [0, 2, 1, 0], [0, 0, 0, 0]]).float().flatten()
    )  # target "a cat and a dog"
    dog = cat.flip(0)
    ref_cat = (
        torch.tensor([[0, 0, 0, 0], [0, 4, 3, 0], [0, 4, 1, 0], [0, 0, 0, 0]]).float().flatten()
    )  # "a cat": token 2
    p = torch.zeros(6, 2, 16, 77)
    spread = torch.linspace(-0.5, 0.5, 16)  # the heads differ; their mean is the map
    for img, token, m in ((2, 2, cat), (2, 5, dog), (0, 2, ref_cat)):
        p[3 + img, 0, :, token], p[3 + img, 1, :, token] = m + spread, m - spread  # conditional rows 3..5
    p[:3] = 9.0  # the unconditional branch is never read
    with torch.no_grad():  # as in a run (latent-optimisation passes, with gradients, are not read)
        block = ir.reads(call)
    assert block == ProbsBlock(slice(3, 6), call.q_image, call.k_text)  # the conditional rows' image→text block
    ir.observe(call, p[block.rows][:, :, block.queries, block.keys].mean(dim=1))  # as `attend` gives it
    run_.state = StepState(1, 999.0, 3)
    got = ir.regions(run_)
    want_cat = (cat.view(4, 4) / 4 > 0.5) & (cat.view(4, 4) >= dog.view(4, 4))
    want_dog = (dog.view(4, 4) / 4 > 0.5) & (dog.view(4, 4) >= cat.view(4, 4))
    assert torch.equal(got[2, 0], want_cat.float()) and torch.equal(got[2, 1], want_dog.float())
    assert torch.equal(got[0, 0], (ref_cat.view(4, 4) / 4 > 0.5).float())  # 3/4 and 1: in; 1/4: out
    assert not got[0, 1].any() and not got[1, 0].any()  # a reference only reads its own subject (dog's map unread)
