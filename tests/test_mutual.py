"""MutualSelfAttention (MasaCtrl; SynPS on FLUX): source rows, K/V replacement, layer counting, errors."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import attnctrl as ac
from attnctrl.attention import AttentionCall, attend
from attnctrl.attention_block import ProbsBlock
from attnctrl.control import Control
from attnctrl.controls.mutual import MutualSelfAttention, auto_masks
from attnctrl.controls.registry import parse_control
from attnctrl.layers import LayerInfo, forward_order
from attnctrl.pipelines import ControlledPipeline
from attnctrl.pipelines.facts import set_run_facts
from attnctrl.selectors import select
from attnctrl.state import BatchLayout, RunContext, StepState
from conftest import call_kwargs

PROMPTS = ["a cat sitting", "a cat jumping", "a cat running"]
SD_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def run(tiny, name, controls=(), prompts=PROMPTS, **kw):
    return ControlledPipeline(tiny(name))(prompts, seed=0, controls=list(controls), **call_kwargs(name, **kw))


class Steps(Control):
    def begin(self, run):
        self.latents = []

    def after_step(self, run, latents):
        self.latents.append(latents.clone())


class Inputs(Control):
    """Placed after MutualSelfAttention: the latents each step starts from."""

    def begin(self, run):
        self.latents = []

    def before_step(self, run, latents, denoise):
        self.latents.append(latents.clone())
        return latents


@pytest.mark.parametrize(
    "name, kw", [("tiny-sd", {"start_step": 1, "start_layer": 2}), ("tiny-sd3", {"start_step": 1}), ("tiny-flux", {})]
)
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
    start = Inputs()
    run(tiny, "tiny-sd", [start])
    shared = start.latents[0][:1].expand(3, -1, -1, -1).clone()  # every row starts from the source's noise
    plain, ctrl = Steps(), Steps()
    run(tiny, "tiny-sd", [plain], latents=shared)
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
    same = run(
        tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2, source_mask=full, target_mask=full)]
    ).images
    assert torch.equal(plain, same)  # all foreground: plain mutual attention
    half = torch.zeros(64, 64)
    half[:, :32] = 1
    out = run(
        tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2, source_mask=half, target_mask=half)]
    ).images
    assert (out[0] - plain[0]).abs().max().item() <= 1e-5 and (out[1:] - plain[1:]).abs().max().item() > 1e-5


def test_flux_synps_defaults_and_weight():
    from attnctrl.layers import LayerInfo

    layers = [LayerInfo(f"transformer_blocks.{i}.attn", "joint", "blocks", i, 1, 2) for i in range(19)]
    layers += [LayerInfo(f"single_transformer_blocks.{i}.attn", "joint", "single", i, 1, 2) for i in range(38)]
    c = MutualSelfAttention()
    kept = c.narrow_layers([(lay, None) for lay in layers], (64, 64))
    assert len(kept) == 57  # the editing measure reads every block
    assert sorted(lay.name for lay in c.sharing_layers(forward_order(layers), "flux")) == sorted(
        [f"transformer_blocks.{i}.attn" for i in (0, 7, 8, 9, 10, 18)]
        + [f"single_transformer_blocks.{i}.attn" for i in (6, 9, 18, 23, 26, 31, 37)]
    )
    st = {"step": 3, "count": 4, "sum": torch.tensor(3.8), "w": 1.0, "rope": {}}
    c.synps.new_step(st, 4)  # mean measure 0.95 between τ_min 0.9 and τ_max 1.0
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


@pytest.mark.parametrize("pin", [True, False])
def test_real_source_image_is_inverted_into_the_source_row(tiny, pin):
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    prompts = ["a cat", "a cat jumping"]
    seen = Inputs()
    c = MutualSelfAttention(start_step=1, start_layer=2, source_image=image, pin_source=pin)
    out = run(tiny, "tiny-sd", [c, seen], prompts=prompts)
    inv = ac.ddim_invert(tiny("tiny-sd"), image, "a cat", num_inference_steps=3)
    for row in (0, 1):  # every image starts from the inverted z_T (MasaCtrl: start_code.expand(len(prompts)))
        assert torch.equal(seen.latents[0][row], inv.at_step(0)[0])
    for i in (1, 2):
        assert torch.equal(seen.latents[i][0], inv.at_step(i)[0]) == pin
    assert isinstance(c, MutualSelfAttention) and torch.isfinite(out.images).all()
    generated = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2)], prompts=prompts)
    assert (out.images[1] - generated.images[1]).abs().max().item() > 1e-3  # the target reads the real image


def test_source_image_under_pndm_follows_the_trajectory_shared_attention_uses(tiny):
    """PNDM (SD 1.x's scheduler) repeats a timestep: [667, 334, 334, 1] for 3 steps. The source row still
    sits at step i on the inversion to that step's timestep — the same latents SharedAttention's
    reference row holds with the same image, prompt and guidance (both invert through `run.invert`)."""
    from test_inversion import pndm_pipe

    from attnctrl.inversion import invert_trajectory

    pipe = pndm_pipe(tiny("tiny-sd"))
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    prompts = ["a cat", "a cat jumping"]
    mutual, shared = Inputs(), Inputs()
    kw = call_kwargs("tiny-sd")
    out = ControlledPipeline(pipe)(
        prompts,
        seed=0,
        controls=[MutualSelfAttention(start_step=1, start_layer=2, source_image=image, inversion_guidance=2.0), mutual],
        **kw,
    )
    ControlledPipeline(pipe)(prompts, seed=0, controls=[ac.SharedAttention(reference_image=image), shared], **kw)
    assert pipe.scheduler.timesteps.tolist() == [667, 334, 334, 1]
    res = invert_trajectory(pipe, image, "a cat", pipe.scheduler.timesteps, guidance_scale=2.0, height=64, width=64)
    assert len(mutual.latents) == len(shared.latents) == 4
    for i, (m, r) in enumerate(zip(mutual.latents, shared.latents, strict=True)):
        assert torch.equal(m[0], r[0]) and torch.equal(m[0], res.at_step(i)[0]), i
    assert torch.equal(mutual.latents[0][1], res.at_step(0)[0])  # one start: the inverted latents in every row
    assert torch.equal(mutual.latents[1][0], mutual.latents[2][0])  # the repeated timestep: the same latents
    assert torch.isfinite(out.images).all()


# ---- one control object, several runs: what a run needs lives on the run ---------------------------


@pytest.mark.parametrize(
    "kw, runs",
    [
        (
            {"start_step": 1, "start_layer": 2, "mask_tokens": "cat"},
            [("tiny-sd", PROMPTS, {}), ("tiny-sd", ["a cat sitting", "a big cat"], {"num_inference_steps": 4})],
        ),
        (
            {"start_step": 1, "start_layer": 2, "source_image": "image"},
            [("tiny-sd", PROMPTS[:2], {}), ("tiny-sd", PROMPTS, {"num_inference_steps": 4})],
        ),
        ({}, [("tiny-flux", PROMPTS, {}), ("tiny-sd3", PROMPTS[:2], {"num_inference_steps": 6})]),  # SynPS; then S = 4
    ],
)
def test_one_control_for_runs_in_a_row_is_a_fresh_control_each_time(tiny, kw, runs):
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    kw = {k: image if v == "image" else v for k, v in kw.items()}
    reused = MutualSelfAttention(**kw)
    for name, prompts, extra in runs + runs[:1]:
        got = run(tiny, name, [reused], prompts=prompts, **extra).images
        fresh = run(tiny, name, [MutualSelfAttention(**kw)], prompts=prompts, **extra).images
        assert torch.equal(got, fresh), name
        assert (got[1:] - run(tiny, name, prompts=prompts, **extra).images[1:]).abs().max().item() > 1e-4  # it acted


class NoStep(Control):
    def after_step(self, run, latents):
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


def test_inversion_needs_a_variance_preserving_scheduler(tiny):
    image = Image.new("RGB", (64, 64), "gray")
    with pytest.raises(ValueError, match="variance-preserving"):  # tiny-sdxl samples with Euler (sigma space)
        run(
            tiny,
            "tiny-sdxl",
            [MutualSelfAttention(start_layer=2, source_image=image), NoStep()],
            prompts=["a cat", "a dog"],
        )


def test_cli_forms():
    c = parse_control("mutual", ["source=1", "start_step=2", "start_layer=3", "pe_modulation=false"])
    assert (c.source, c.start_step, c.start_layer, c.pe_modulation) == (1, 2, 3, False)
    c = parse_control(
        "mutual", ["mask_tokens=cat,hat", "target_mask_tokens=dog", "same_noise=false", "mask_threshold=0.2"]
    )
    assert (c.mask_tokens, c.target_mask_tokens, c.same_noise, c.mask_threshold) == (
        ["cat", "hat"],
        ["dog"],
        False,
        0.2,
    )


# ---- one start noise for every image (MasaCtrl: start_code.expand; SynPS: repeat "1 ... -> bs ...") ----


@pytest.mark.parametrize("name, source", [("tiny-sd", 0), ("tiny-sd", 3), ("tiny-flux", 1)])
def test_every_image_starts_from_the_source_noise(tiny, name, source):
    prompts = ["a cat sitting", "a cat jumping"]  # 2 prompts x 2 images each: images 0..3, prompt-major
    stock, seen = Inputs(), Inputs()
    run(tiny, name, [stock], prompts=prompts, num_images_per_prompt=2)
    kw = {"start_step": 1, "start_layer": 2} if name == "tiny-sd" else {}
    run(tiny, name, [MutualSelfAttention(source=source, **kw), seen], prompts=prompts, num_images_per_prompt=2)
    assert (
        stock.latents[0][1:] - stock.latents[0][:1]
    ).abs().max().item() > 1.0  # the generator draws one start per image
    z = seen.latents[0]
    assert z.shape[0] == 4
    for row in range(4):
        assert torch.equal(z[row], stock.latents[0][source])  # the source's own draw, in every row
    assert not torch.equal(seen.latents[1][1], seen.latents[1][2])  # only step 0: the rows then go their own ways


def test_a_target_with_the_source_prompt_reproduces_the_source(tiny):
    prompts = ["a cat sitting", "a cat jumping", "a cat sitting"]
    stock = run(tiny, "tiny-sd", prompts=prompts).images
    out = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2)], prompts=prompts).images
    assert (out[0] - stock[0]).abs().max().item() <= 1e-5  # the source is vanilla
    # same prompt, same start, same keys: the same latents (float32 rounding at most; bit-equal on AVX2 and AVX-512)
    assert (out[2] - out[0]).abs().max().item() <= 1e-5
    assert (out[1] - out[0]).abs().max().item() > 0.5  # the other prompt still changes the image


def test_same_noise_false_keeps_each_images_own_start_and_works_with_attach(tiny):
    start = Inputs()
    run(tiny, "tiny-sd", [start], prompts=PROMPTS[:2])
    seen = Inputs()
    c = MutualSelfAttention(start_step=1, start_layer=2, same_noise=False)
    run(tiny, "tiny-sd", [c, seen], prompts=PROMPTS[:2])
    assert torch.equal(seen.latents[0], start.latents[0])
    assert isinstance(c, MutualSelfAttention) and not c.implements("before_step")
    with (
        pytest.raises(ValueError, match="before_step"),
        ac.attach(tiny("tiny-sd"), [MutualSelfAttention(start_step=1, start_layer=2)]),
    ):
        pass
    # under attach the user passes one start code for every image, as MasaCtrl's playground does
    ref = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2)], prompts=PROMPTS[:2]).images
    pipe = tiny("tiny-sd")
    with ac.attach(pipe, [c]):
        got = pipe(
            PROMPTS[:2], latents=start.latents[0][:1].expand(2, -1, -1, -1).clone(), **call_kwargs("tiny-sd")
        ).images
    assert (got - ref).abs().max().item() <= 1e-5


# ---- the mask-guided variant by value, on one layer call ----------------------------------------

SELF_LAYER = LayerInfo(SD_LAYER, "self", "up", 1, 2, 1)


def _self_call(run, q, k, v, grid):
    return AttentionCall(
        layer=SELF_LAYER,
        run=run,
        q=q,
        k=k,
        v=v,
        q_image=slice(0, q.shape[2]),
        k_image=slice(0, k.shape[2]),
        grid=grid,
        scale=q.shape[-1] ** -0.5,
    )


def _qkv(tokens):
    """Zero queries (so a query's weights are uniform over the keys it may read) and distinct values per row."""
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(4, 1, tokens, 3)
    k = torch.randn(4, 1, tokens, 3, generator=g)
    v = torch.randn(4, 1, tokens, 3, generator=g)
    return q, k, v


def _mean_rows(vs, cells):
    return vs[torch.tensor(cells)].mean(0)


def test_mask_guided_foreground_reads_the_source_foreground_by_value():
    # CFG batch: rows (uncond source, uncond target, cond source, cond target); 2x2 token grid
    run = RunContext(family="sd", layout=BatchLayout.build(2, True), grid=(2, 2))
    source_mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # source foreground: keys 0, 1
    target_mask = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # target foreground: query 3
    c = MutualSelfAttention(start_step=0, source_mask=source_mask, target_mask=target_mask)
    c.begin(run)
    q, k, v = _qkv(4)
    o = attend(_self_call(run, q, k, v, (2, 2)), [(c, None)])
    for s, t in ((0, 1), (2, 3)):  # each branch: its own source row
        fg, bg = _mean_rows(v[s, 0], [0, 1]), _mean_rows(v[s, 0], [2, 3])
        assert torch.allclose(o[t, 0], torch.stack([bg, bg, bg, fg]), atol=1e-6)
        assert torch.allclose(o[s, 0], v[s, 0].mean(0).expand(4, 3), atol=1e-6)  # the source reads itself


# ---- MaskAuto (MasaCtrl's MutualSelfAttentionControlMaskAuto) -----------------------------------


def test_auto_masks_normalise_resize_and_threshold_by_value():
    maps = torch.tensor(
        [
            [0.0, 5.0, 10.0, 1.0],  # min-max: 0, .5, 1, .1 -> foreground where >= 0.1 (inclusive)
            [20.0, 2.0, 2.9, 2.0],  # (x - 2) / 18: 1, 0, .05, 0 (x / max would keep all four)
            [3.0, 3.0, 3.0, 3.0],  # constant: all background
        ]
    )
    got = auto_masks(maps, (2, 2), (4, 4), 0.1).view(3, 4, 4).int()
    assert got[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]  # nearest upsampling
    assert got[1].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert got[2].sum().item() == 0
    assert auto_masks(maps[:1], (2, 2), (2, 2), 0.5).int().tolist() == [[0, 1, 1, 0]]


MID_CROSS = LayerInfo("mid_block.attentions.0.transformer_blocks.0.attn2", "cross", "mid", 0, 4, 2)


def _maps_call(run, p):
    return AttentionCall(
        layer=MID_CROSS,
        run=run,
        q=torch.zeros(4, 2, 4, 3),
        k=torch.zeros(4, 2, 77, 3),
        v=torch.zeros(4, 2, 77, 3),
        q_image=slice(0, 4),
        k_image=slice(0, 0),
        k_text=slice(0, 77),
        grid=(2, 2),
        scale=1.0,
    )


def _probs(source_heads, target_heads, cat=2, dog=3):
    """Probabilities (4 rows, 2 heads, 4 queries, 77 tokens): the cond rows' maps of "cat" (source row) and
    "dog" (target row) per head; decoys on every other row and token."""
    p = torch.zeros(4, 2, 4, 77)
    decoy = torch.tensor([7.0, 0.0, 0.0, 7.0])
    p[:, :, :, :] = decoy.view(1, 1, 4, 1)
    p[2, :, :, cat] = torch.tensor(source_heads)
    p[3, :, :, dog] = torch.tensor(target_heads)
    return p


def _observe(c, call, p):
    """Give `c` its declared block of `p` as `attend` does: the block's rows, queries and keys, head-averaged."""
    block = c.reads(call)
    assert block == ProbsBlock(slice(2, 4), call.q_image, call.k_text)  # the conditional rows' image→text maps
    c.observe(call, p[block.rows][:, :, block.queries, block.keys].mean(dim=1))


@torch.no_grad()  # as in the loop (latent-optimisation passes, with grad, are not read)
def test_auto_masks_come_from_this_steps_conditional_maps_of_the_chosen_tokens(tiny):
    pipe = ControlledPipeline(tiny("tiny-sd"))
    c = MutualSelfAttention(start_step=0, start_layer=2, mask_tokens="cat", target_mask_tokens="dog")
    picked = c.narrow_layers(select(pipe.layers(), c.layers, (8, 8)), (8, 8))
    cross = [lay.name for lay, _ in picked if lay.kind == "cross"]
    assert cross == [MID_CROSS.name]  # the maps: cross-attention at 1/4 of the grid (MasaCtrl: 16x16 at 512 px)
    run = RunContext(
        family="sd", layout=BatchLayout.build(2, True), grid=(8, 8), prompts=["a cat sitting", "a big dog"]
    )
    set_run_facts(run, pipe.pipe, pipe.denoiser, pipe.adapter)  # the tokenizers: words -> indices
    c.begin(run)
    run.state = StepState(0, 999.0, 4)
    # two layers, two heads: the mean over both is source [0, 5, 10, 1] (fg 1, 2, 3), target [10, 5, .9, 0] (fg 0, 1;
    # not the source's complement, so swapping the two masks' roles shows); a single layer or head alone gives other masks
    for src, tgt in (
        ([[0, 20, 0, 0], [0, 0, 0, 4]], [[20, 0, 0, 0], [0, 0, 0, 0]]),
        ([[0, 0, 20, 0], [0, 0, 20, 0]], [[0, 20, 3.6, 0], [20, 0, 0, 0]]),
    ):
        _observe(c, _maps_call(run, None), _probs(src, tgt))
    q, k, v = _qkv(16)  # an up-block self-attention layer at 4x4: the 2x2 masks resized (nearest)
    o = attend(_self_call(run, q, k, v, (4, 4)), [(c, None)])
    src_fg = [2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 2x2 [[0, 1], [1, 1]] at 4x4
    tgt_fg = [0, 1, 2, 3, 4, 5, 6, 7]  # 2x2 [[1, 1], [0, 0]] at 4x4
    for s, t in ((0, 1), (2, 3)):  # the uncond rows use the cond rows' masks
        fg, bg = _mean_rows(v[s, 0], src_fg), _mean_rows(v[s, 0], [0, 1, 4, 5])
        want = torch.stack([fg if j in tgt_fg else bg for j in range(16)])
        assert torch.allclose(o[t, 0], want, atol=1e-6)
        assert torch.allclose(o[s, 0], v[s, 0].mean(0).expand(16, 3), atol=1e-6)
    # the next step: no map of it yet -> plain mutual attention; then its own maps only
    run.state = StepState(1, 500.0, 4)
    o = attend(_self_call(run, q, k, v, (4, 4)), [(c, None)])
    assert torch.allclose(o[3, 0], v[2, 0].mean(0).expand(16, 3), atol=1e-6)
    _observe(c, _maps_call(run, None), _probs([[0, 0, 0, 9], [0, 0, 0, 9]], [[0, 0, 0, 9], [0, 0, 0, 9]]))
    o = attend(_self_call(run, q, k, v, (4, 4)), [(c, None)])
    corner = [10, 11, 14, 15]  # cell 3 only
    fg, bg = _mean_rows(v[2, 0], corner), _mean_rows(v[2, 0], [j for j in range(16) if j not in corner])
    assert torch.allclose(o[3, 0], torch.stack([fg if j in corner else bg for j in range(16)]), atol=1e-6)


class MaskCheck(Control):
    """Placed after MutualSelfAttention(mask_tokens=...): records each step's map at the mid cross-attention
    and checks the targets of one up-block self-attention layer against MaskAuto built from it."""

    default_layers = ["name=mid_block.attentions.0.transformer_blocks.0.attn2", f"name={SD_LAYER}"]
    observes_only = True

    def __init__(self, source_token, target_token, start_step):
        super().__init__()
        self.tokens, self.start_step = (source_token, target_token), start_step
        self.checked, self.moved, self.maps = 0, 0.0, None

    def needs_probs(self, call):
        return call.k_text is not None

    def probs(self, call, p):
        m = p[call.run.layout.rows("cond")].float().mean(1)  # (images, 64, 77)
        self.maps = torch.stack([m[0, :, self.tokens[0]], m[1, :, self.tokens[1]]])
        return p

    def out(self, call, o):
        if call.k_text is not None or call.run.state.index < self.start_step:
            return o
        masks = auto_masks(self.maps, (8, 8), call.grid, 0.1)
        assert 0 < masks[0].sum() < masks.shape[1]  # a real fore- and background
        t = torch.tensor([1, 3])
        q, k, v = call.q[t], call.k[t], call.v[t]  # k, v: already the source's
        fg = torch.where(masks[0], 0.0, float("-inf")).view(1, 1, 1, -1)
        o_fg = F.scaled_dot_product_attention(q, k, v, attn_mask=fg)
        o_bg = F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.where(masks[0], float("-inf"), 0.0).view(1, 1, 1, -1)
        )
        m = masks[1].float().view(1, 1, -1, 1)
        assert torch.allclose(o[t], m * o_fg + (1 - m) * o_bg, atol=1e-5)
        self.moved = max(self.moved, (o[t] - F.scaled_dot_product_attention(q, k, v)).abs().max().item())
        self.checked += 1
        return o


def test_mask_auto_end_to_end_uses_the_masks(tiny):
    prompts = ["a cat sitting", "a cat jumping"]
    check = MaskCheck(2, 2, start_step=1)
    c = MutualSelfAttention(start_step=1, start_layer=2, mask_tokens="cat")
    out = run(tiny, "tiny-sd", [c, check], prompts=prompts).images
    assert check.checked == 2 and check.moved > 1e-3  # steps 1 and 2, and the masks changed the output
    plain = run(tiny, "tiny-sd", [MutualSelfAttention(start_step=1, start_layer=2)], prompts=prompts).images
    stock = run(tiny, "tiny-sd", prompts=prompts).images
    assert (out[0] - stock[0]).abs().max().item() <= 1e-5  # the source stays vanilla
    assert (out[1] - plain[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("tiny-sd", {"mask_tokens": "zebra"}, "zebra"),
        ("tiny-flux", {"mask_tokens": "cat"}, "SD and SDXL"),
    ],
)
def test_mask_tokens_errors_before_any_step(tiny, name, kwargs, message):
    extra = {"start_layer": 2} if name == "tiny-sd" else {}
    with pytest.raises((ValueError, NotImplementedError), match=message):
        run(tiny, name, [MutualSelfAttention(**extra, **kwargs), NoStep()], prompts=PROMPTS[:2])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_tokens": "cat", "source_mask": torch.ones(4, 4), "target_mask": torch.ones(4, 4)}, "not both"),
        ({"target_mask_tokens": "dog"}, "needs mask_tokens"),
        ({"mask_tokens": ""}, "mask_tokens"),
        ({"mask_tokens": "cat", "mask_threshold": 1.5}, "mask_threshold"),
        ({"same_noise": "yes"}, "same_noise"),
    ],
)
def test_bad_mask_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MutualSelfAttention(**kwargs)


# ---- SynPS: the editing measure and the weight schedule, by value --------------------------------


@pytest.mark.parametrize(
    "m, kw, w",
    [
        (0.92, {}, 0.8),  # (1.0 - 0.92) / (1.0 - 0.9); the flipped schedule would give 0.2
        (0.98, {}, 0.2),
        (0.85, {}, 1.0),  # below tau_min: full positional cues
        (1.03, {}, 0.0),  # above tau_max: none
        (0.9, {"pe_min": 0.8, "pe_max": 1.2}, 0.75),
    ],
)
def test_synps_weight_schedule(m, kw, w):
    c = MutualSelfAttention(**kw)
    st = {"step": 3, "count": 2, "sum": torch.tensor(2 * m), "w": 1.0, "rope": {}}
    c.synps.new_step(st, 3)
    assert st["w"] == 1.0  # same step: unchanged
    c.synps.new_step(st, 4)
    assert abs(float(st["w"]) - w) < 1e-5 and st["count"] == 0


def _joint(rows_img, rows_txt):
    """Attention output (4 rows, 1 head, 2 text + 2 image tokens, 2 dims); only each row's first token of a part is nonzero."""
    o = torch.zeros(4, 1, 4, 2)
    for r, (img, txt) in enumerate(zip(rows_img, rows_txt)):
        o[r, 0, 0], o[r, 0, 2] = torch.tensor(txt), torch.tensor(img)
    return o


def test_synps_measure_by_value():
    c = MutualSelfAttention()
    run = SimpleNamespace(layout=BatchLayout.build(2, True), state=StepState(0, 1.0, 4), store={})
    st = {"rows": {}, "w": 1.0, "sum": None, "count": 0, "step": 0, "rope": {}, "modulate": True, "cells": {}}
    run.store[c] = st
    layer = LayerInfo("transformer_blocks.0.attn", "joint", "blocks", 0, 1, 1)
    one, anti = [1.0, 0.0], [-1.0, 0.0]
    # rows: uncond source, uncond target (decoys: cos -1), cond source, cond target
    blocks = [
        _joint([one, anti, one, [0.96, 0.28]], [one, anti, one, one]),  # cos_img 0.96 / cos_txt 1 = 0.96
        _joint([one, anti, one, [0.8, 0.6]], [one, anti, one, [0.8, 0.6]]),  # 0.8 / 0.8 = 1.0
    ]
    for o in blocks:
        call = SimpleNamespace(run=run, layer=layer, q=o, q_image=slice(2, 4), q_text=slice(0, 2), k_text=slice(0, 2))
        assert torch.equal(c.out(call, o), o)  # the measure only reads
    assert st["count"] == 2 and abs(float(st["sum"]) / 2 - 0.98) < 1e-6
    c.synps.new_step(st, 1)
    assert abs(float(st["w"]) - 0.2) < 1e-5  # (1.0 - 0.98) / 0.1
