"""SharedAttention (StyleAligned; AlignedGen ShiftPE on FLUX): the papers' properties, an independent
re-derivation of one layer call, composition, reference images and the CLI."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.models.embeddings import apply_rotary_emb
from PIL import Image
from test_inversion import ddim_inversion_by_hand, pndm_pipe

import attnctrl as ac
from attnctrl.cli import main
from attnctrl.control import Control
from attnctrl.controls.shared import inverted_index
from attnctrl.inversion import encode_image, invert_trajectory
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs, processors_of, stock_latents

PROMPTS = ["a red car", "a white sheep", "a blue house"]


def first_self_layer(pipe) -> str:
    return next(layer.name for layer in ControlledPipeline(pipe).layers() if layer.has_part("self"))


class Probe(Control):
    """Records q/k/v (qkv hook) and the output (out hook) of the first call on one layer."""

    def __init__(self, layer):
        super().__init__(layers=f"name={layer}")
        self.seen = None
        self.o = None

    def qkv(self, call):
        if self.seen is None:
            self.seen = {
                "q": call.q.clone(),
                "k": call.k.clone(),
                "v": call.v.clone(),
                "scale": call.scale,
                "rope": call.extras.get("rope"),
                "k_image": call.k_image,
                "q_image": call.q_image,
            }

    def out(self, call, o):
        if self.o is None:
            self.o = o.clone()
        return o


def _run(pipe, name, prompts, controls, **extra):
    return ControlledPipeline(pipe)(prompts, seed=0, controls=controls, **call_kwargs(name, **extra)).images


# ---- the papers' properties ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_reference_row_is_identical_to_a_run_without_the_control(tiny, name):
    """Bit for bit, on AVX2 and AVX-512 alike. Both runs have the same batch (same shapes, so every
    GEMM / norm / conv runs the same kernel with the same blocking and rows stay independent), and
    the control computes the reference rows' self-attention as the stock layer does: SDPA over
    their own keys, no mask. (Inside the batched call, with −∞ over the appended keys, they differed
    by 1.2-3.6e-5 in the final latents: another SDPA kernel path.) A reference row that reads any
    target key moves by ~1e-1 here."""
    pipe = tiny(name)
    plain = _run(pipe, name, PROMPTS, [])
    shared = _run(pipe, name, PROMPTS, [ac.SharedAttention(reference=1, score_shift=math.log(2), shared_scale=0.9)])
    assert torch.equal(shared[1], plain[1])
    assert (shared[[0, 2]] - plain[[0, 2]]).abs().max().item() > 1e-3  # the targets did change


class ZeroBias(Control):
    """Adds an all-zero logits bias on every self-attention layer (changes nothing but the kernel path)."""

    def bias(self, call):
        return torch.zeros(call.batch, 1, 1, call.k.shape[2], dtype=call.q.dtype)


def test_reference_row_reads_no_target_key_next_to_a_bias_control(tiny):
    """With another bias on the layer the reference rows stay in the batched call (−∞ on the shared
    keys), so they match a run without SharedAttention only up to float32 rounding: SDPA with twice
    the keys sums the online softmax in other blocks (≈1e-7 per layer call, measured ≤ 3e-7); the
    random tiny UNet amplifies that over 3 steps to ≤ 4e-5 (measured 1.2-3.6e-5 on AVX2 and
    AVX-512). 1e-4 keeps a 2.5× margin; a reference row that reads a target's keys moves by > 1e-2."""
    pipe = tiny("tiny-sd")
    plain = _run(pipe, "tiny-sd", PROMPTS, [ZeroBias()])
    shared = _run(pipe, "tiny-sd", PROMPTS, [ac.SharedAttention(reference=1, score_shift=math.log(2)), ZeroBias()])
    assert (shared[1] - plain[1]).abs().max().item() <= 1e-4
    assert (shared[[0, 2]] - plain[[0, 2]]).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_one_image_is_a_no_op(tiny, name):
    pipe = tiny(name)
    out = _run(pipe, name, PROMPTS[0], [ac.SharedAttention()])
    assert (out - stock_latents(pipe, PROMPTS[0], **call_kwargs(name))).abs().max().item() <= 1e-5


def test_adain_gives_targets_the_reference_statistics(tiny):
    pipe = tiny("tiny-sd")
    layer = first_self_layer(pipe)
    after = Probe(layer)
    ControlledPipeline(pipe)(
        PROMPTS, seed=0, controls=[ac.SharedAttention(reference=2), after], **call_kwargs("tiny-sd")
    )
    q, k = after.seen["q"], after.seen["k"][:, :, : after.seen["q"].shape[2]]
    for x in (q, k):
        for branch in (0, 1):  # uncond, cond: each has its own reference row
            rows = [branch * 3 + i for i in range(3)]
            ref = x[rows[2]]
            for r in rows[:2]:
                assert torch.allclose(x[r].mean(-2), ref.mean(-2), atol=1e-4)
                assert torch.allclose(x[r].std(-2), ref.std(-2), rtol=1e-3, atol=1e-4)


def test_outside_layers_and_steps_is_stock(tiny):
    pipe = tiny("tiny-sd")
    layer = first_self_layer(pipe)
    seen = []

    class Spy(Control):
        default_layers = "self"

        def qkv(self, call):
            seen.append((call.run.state.index, call.layer.name, call.k.shape[2] > call.q.shape[2]))

    lat = {}

    def keep(_pipe, i, t, cb):
        lat.setdefault(len(lat), cb["latents"].clone())
        return cb

    cp = ControlledPipeline(pipe)
    kw = call_kwargs("tiny-sd")
    cp(
        PROMPTS[:2],
        seed=0,
        controls=[ac.SharedAttention(layers=f"name={layer}", steps=(1, 3)), Spy()],
        callback_on_step_end=keep,
        **kw,
    )
    shared_lat, lat = lat, {}
    cp(PROMPTS[:2], seed=0, callback_on_step_end=keep, **kw)
    assert {(i, n) for i, n, ext in seen if ext} == {(1, layer), (2, layer)}
    assert torch.equal(shared_lat[0], lat[0]) or (shared_lat[0] - lat[0]).abs().max().item() <= 1e-6  # step 0: stock
    assert (shared_lat[2] - lat[2]).abs().max().item() > 1e-4


def test_sdxl_layer_call_matches_the_papers_equations(tiny):
    """StyleAligned Eq. 3-4 written out here: AdaIN(x, y) = σ_y (x − μ_x)/σ_x + μ_y over tokens;
    the target attends to [its own K ; s·K_ref] with +δ on the reference logits, the reference to itself."""
    pipe = tiny("tiny-sdxl")
    layer = first_self_layer(pipe)
    before, after = Probe(layer), Probe(layer)
    s, delta = 0.8, math.log(2)
    control = ac.SharedAttention(reference=1, shared_scale=s, score_shift=delta, adain_values=True)
    ControlledPipeline(pipe)(PROMPTS[:2], seed=0, controls=[before, control, after], **call_kwargs("tiny-sdxl"))
    q, k, v, scale = (before.seen[x] for x in ("q", "k", "v", "scale"))
    assert q.shape[0] == 4  # uncond ×2, cond ×2

    def stats(x):
        return x.mean(dim=-2, keepdim=True), (x.var(dim=-2, keepdim=True) + 1e-5).sqrt()

    def norm_to(x, y):
        (mx, sx), (my, sy) = stats(x), stats(y)
        return sy * (x - mx) / sx + my

    expected = torch.empty_like(after.o)
    for ref, tgt in ((1, 0), (3, 2)):
        expected[ref] = torch.softmax(q[ref] @ k[ref].transpose(-1, -2) * scale, -1) @ v[ref]
        qt, kt, vt = norm_to(q[tgt], q[ref]), norm_to(k[tgt], k[ref]), norm_to(v[tgt], v[ref])
        logits = torch.cat([qt @ kt.transpose(-1, -2) * scale, qt @ (s * k[ref]).transpose(-1, -2) * scale + delta], -1)
        expected[tgt] = torch.softmax(logits, -1) @ torch.cat([vt, v[ref]], -2)
    assert (after.o - expected).abs().max().item() <= 1e-5


FLUX_SINGLE = ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


def _shifted_reference_keys(pipe, cp, before):
    """The reference row's image keys re-rotated with AlignedGen's shifted positions, written out here."""
    img = before.seen["k_image"]
    cos, sin = before.seen["rope"]
    k_ref_raw = apply_rotary_emb(before.seen["k"][0:1, :, img], (cos[img], -sin[img]))  # un-rotate
    h, w = cp.default_grid()
    ids = torch.tensor([[0.0, i, j] for i in range(h) for j in range(w)])
    ids[:, 2] += w  # official: reference_image_ids[:, 2] += width // 16
    return apply_rotary_emb(k_ref_raw, pipe.transformer.pos_embed(ids))


def test_flux_shifted_position_embedding(tiny):
    """AlignedGen ShiftPE: the reference's image keys carry RoPE positions shifted by the width along x."""
    pipe = tiny("tiny-flux")
    before, after = Probe(FLUX_SINGLE[0]), Probe(FLUX_SINGLE[0])
    cp = ControlledPipeline(pipe)
    cp(
        PROMPTS[:2],
        seed=0,
        controls=[before, ac.SharedAttention(reference=0, shared_scale=1.0), after],
        **call_kwargs("tiny-flux"),
    )
    shifted = _shifted_reference_keys(pipe, cp, before)
    appended = after.seen["k"][:, :, before.seen["k"].shape[2] :]
    assert appended.shape[2] == shifted.shape[2]
    for row in (0, 1):  # the reference row's copy (masked) and the target's
        assert (appended[row : row + 1] - shifted).abs().max().item() <= 1e-4


def test_flux_defaults_are_aligned_gen(tiny):
    """AlignedGen's inference.py: block=(19, 57) (FLUX.1's 38 single-stream blocks), style_lambda 1.1
    ("fix") on the reference keys the targets see, timesteps=(0, 30) of a 30-step run (every step)."""
    pipe = tiny("tiny-flux")
    seen = set()

    class Spy(Control):
        default_layers = "self"

        def qkv(self, call):
            seen.add((call.run.state.index, call.layer.name, call.k.shape[2] > call.q.shape[2]))

    before, after = Probe(FLUX_SINGLE[0]), Probe(FLUX_SINGLE[0])
    cp = ControlledPipeline(pipe)
    kw = call_kwargs("tiny-flux")
    cp(PROMPTS[:2], seed=0, controls=[before, ac.SharedAttention(), after, Spy()], **kw)
    assert {(i, n) for i, n, ext in seen if ext} == {(i, n) for i in range(3) for n in FLUX_SINGLE}
    assert {n for _, n, ext in seen if not ext} == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    appended = after.seen["k"][:, :, before.seen["k"].shape[2] :]
    assert torch.equal(appended[1], appended[0] * 1.1)  # the target sees 1.1·K_ref; the reference's copy is masked
    assert (appended[0:1] - _shifted_reference_keys(pipe, cp, before)).abs().max().item() <= 1e-4

    preset = ac.SharedAttention.aligned_gen()
    assert (preset.layers, preset.shared_scale, preset.steps, preset.score_shift) == ("single", 1.1, None, 0.0)
    out = cp(PROMPTS[:2], seed=0, controls=[ac.SharedAttention()], **kw).images
    assert torch.equal(cp(PROMPTS[:2], seed=0, controls=[preset], **kw).images, out)
    # SD / SDXL keep StyleAligned's defaults: every self-attention layer, s = 1
    everywhere = cp(PROMPTS[:2], seed=0, controls=[ac.SharedAttention(layers="self", shared_scale=1.1)], **kw).images
    assert (everywhere - out).abs().max().item() > 1e-4


# ---- errors and composition ----------------------------------------------------------------------


def test_reference_outside_the_batch_fails_before_any_step(tiny):
    pipe = tiny("tiny-sd")
    before = processors_of(pipe)
    steps = []

    class Spy(Control):
        def combine(self, run, preds, guided):
            steps.append(run.state.index)
            return guided

    with pytest.raises(ValueError, match=r"reference=2 is outside the batch of 2 image"):
        _run(pipe, "tiny-sd", PROMPTS[:2], [ac.SharedAttention(reference=2), Spy()])
    assert steps == [] and processors_of(pipe) == before
    with pytest.raises(ValueError, match="reference must be"):
        ac.SharedAttention(reference=-1)
    with pytest.raises(ValueError, match="GroupNorm"):
        _run(tiny("tiny-flux"), "tiny-flux", PROMPTS[:2], [ac.SharedAttention(shared_norms=True)])
    with pytest.raises(ValueError, match="heads"):
        _run(pipe, "tiny-sd", PROMPTS[:2], [ac.SharedAttention(layers="self,heads=0")])


def test_composes_with_maps_and_pag(tiny):
    pipe = tiny("tiny-sd")
    cp = ControlledPipeline(pipe)
    kw = call_kwargs("tiny-sd")
    base = cp(PROMPTS[:2], seed=0, controls=[ac.AttentionMaps(), ac.PAG("mid")], **kw)
    out = cp(PROMPTS[:2], seed=0, controls=[ac.SharedAttention(), ac.AttentionMaps(), ac.PAG("mid")], **kw)
    assert out.maps is not None
    # same batch (uncond, cond, perturbed) in both runs; PAG acts after SharedAttention on the mid
    # layer, so the reference rows are recomputed stock there too: bit for bit (was 2.5-3.6e-5)
    assert torch.equal(out.images[0], base.images[0])
    assert (out.images[1] - base.images[1]).abs().max().item() > 1e-3


def test_shared_group_norms_keep_the_reference_and_change_targets(tiny):
    pipe = tiny("tiny-sdxl")
    before = {id(m): dict(m._forward_hooks) for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    plain = _run(pipe, "tiny-sdxl", PROMPTS[:2], [ac.SharedAttention()])
    normed = _run(pipe, "tiny-sdxl", PROMPTS[:2], [ac.SharedAttention(shared_norms=True)])
    assert torch.equal(normed[0], plain[0])
    assert (normed[1] - plain[1]).abs().max().item() > 1e-4
    after = {id(m): dict(m._forward_hooks) for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert after == before  # hooks removed at the end of the run


class NormProbe(Control):
    """Records the input and the final output (after every other forward hook) of one module's first call."""

    def __init__(self, module):
        super().__init__()
        self.module, self.seen, self._handle = module, None, None

    def begin(self, run):
        def hook(mod, args, output):
            if self.seen is None:
                self.seen = (args[0].clone(), output.clone())

        self._handle = self.module.register_forward_hook(hook)  # after SharedAttention's (controls begin in order)

    def end(self, run):
        self._handle.remove()


@pytest.mark.parametrize("module", ["down_blocks.1.resnets.0.norm2", "mid_block.attentions.0.norm"])
def test_shared_group_norm_uses_joint_target_and_reference_statistics(tiny, module):
    """StyleAligned's register_shared_norm: the GroupNorm input of row b becomes [x_b ; x_ref] along
    height, so a target's group mean and (biased) variance are those of its own and the reference's
    elements together, equal weight; written out here in float64. The reference rows are untouched."""
    pipe = tiny("tiny-sdxl")
    norm = pipe.unet.get_submodule(module)
    probe = NormProbe(norm)
    _run(pipe, "tiny-sdxl", PROMPTS[:2], [ac.SharedAttention(reference=0, shared_norms=True), probe])
    x, y = probe.seen  # step 0: rows uncond 0, 1 then cond 0, 1; the references are rows 0 and 2
    g, eps = norm.num_groups, norm.eps
    w, b = norm.weight.double()[:, None, None], norm.bias.double()[:, None, None]

    def normalise(xt, mu, var):
        return ((xt - mu) / (var + eps).sqrt()).reshape(x.shape[1:]) * w + b

    for t, r in ((1, 0), (3, 2)):
        xt, xr = x[t].double().reshape(g, -1), x[r].double().reshape(g, -1)
        joint = torch.cat([xt, xr], dim=1)
        expected = normalise(xt, joint.mean(1, keepdim=True), joint.var(1, unbiased=False, keepdim=True))
        assert (y[t].double() - expected).abs().max().item() <= 1e-5
        # the statistics matter: neither the target's own nor the reference's alone give that
        own = normalise(xt, xt.mean(1, keepdim=True), xt.var(1, unbiased=False, keepdim=True))
        ref_only = normalise(xt, xr.mean(1, keepdim=True), xr.var(1, unbiased=False, keepdim=True))
        assert (expected - own).abs().max().item() > 1e-2 and (expected - ref_only).abs().max().item() > 1e-2
    stock = F.group_norm(x, g, norm.weight, norm.bias, eps)
    assert torch.equal(y[[0, 2]], stock[[0, 2]])


# ---- reference from a real image -------------------------------------------------------------------


def _image():
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))


class RefRow(Control):
    """Records the reference row's latents and the timestep at the input of every step."""

    def __init__(self, row=0):
        super().__init__()
        self.row, self.seen, self.timesteps = row, [], []

    def before_step(self, run, latents, denoise):
        self.seen.append(latents[self.row].clone())
        self.timesteps.append(int(run.state.timestep))
        return latents


def _ddim_timesteps(pipe, steps):
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(steps)
    return ddim.timesteps


def test_reference_image_under_pndm_is_a_ddim_inversion_to_each_steps_timestep(tiny):
    """SD 1.x's default PNDM repeats a timestep; the reference row at step i still holds the DDIM
    inversion (guidance 2, computed by hand here) to that step's own timestep t_i."""
    pipe = pndm_pipe(tiny("tiny-sd"))
    spy = RefRow()
    out = _run(pipe, "tiny-sd", PROMPTS[:2], [ac.SharedAttention(reference_image=_image()), spy])
    assert spy.timesteps == [667, 334, 334, 1]
    by_hand = ddim_inversion_by_hand(pipe, encode_image(pipe, _image(), 64, 64), PROMPTS[0], 3, guidance=2.0)
    for i, (z, t) in enumerate(zip(spy.seen, spy.timesteps)):
        assert (z - by_hand[t][0]).abs().max().item() <= 1e-5, (i, t)
    assert torch.isfinite(out).all()


def test_inverted_index_is_the_official_callback_schedule():
    """StyleAligned's make_inversion_callback(zts, offset): the run starts from zts[offset] and after
    step i the callback writes zts[max(offset + 1, i + 1)] (zts[m]: latents at the m-th timestep)."""
    assert [inverted_index(i, 0, 5) for i in range(5)] == [0, 1, 2, 3, 4]
    assert [inverted_index(i, 1, 5) for i in range(5)] == [1, 2, 2, 3, 4]
    assert [inverted_index(i, 2, 5) for i in range(5)] == [2, 3, 3, 3, 4]
    assert [inverted_index(i, 4, 5) for i in range(5)] == [4, 5, 5, 5, 5]  # 5: the clean latents
    n = 7
    for offset in range(n):  # the callback run step by step, the official way
        zts = list(range(n + 1))
        latents, official = zts[offset], []
        for i in range(n):
            official.append(latents)
            latents = zts[max(offset + 1, i + 1)]
        assert [inverted_index(i, offset, n) for i in range(n)] == official, offset


@pytest.mark.parametrize("offset, picked", [(0, [0, 1, 2, 3]), (1, [1, 2, 2, 3]), (2, [2, 3, 3, 3]), (3, [3, 4, 4, 4])])
def test_reference_row_takes_the_offset_inverted_latents(tiny, offset, picked):
    """At step i the reference row holds `at_step(picked[i])` of the guidance-2 inversion (4: z_0)."""
    pipe = tiny("tiny-sd")
    spy = RefRow()
    control = ac.SharedAttention(reference_image=_image(), inversion_offset=offset)
    _run(pipe, "tiny-sd", PROMPTS[:2], [control, spy], num_inference_steps=4)
    res = invert_trajectory(
        pipe, _image(), PROMPTS[0], _ddim_timesteps(pipe, 4), guidance_scale=2.0, height=64, width=64
    )
    assert spy.timesteps == res.timesteps.tolist() == [751, 501, 251, 1]
    for z, k in zip(spy.seen, picked, strict=True):
        assert torch.equal(z, res.at_step(k)[0])


def test_inversion_guidance_reaches_the_reference_row(tiny):
    """Default 2 (StyleAligned's transfer notebook: ddim_inversion(pipeline, x0, prompt, 50, 2))."""
    assert ac.SharedAttention().inversion_guidance == 2.0
    pipe = tiny("tiny-sd")
    spy = RefRow()
    _run(pipe, "tiny-sd", PROMPTS[:2], [ac.SharedAttention(reference_image=_image(), inversion_guidance=1.0), spy])
    ts = _ddim_timesteps(pipe, 3)
    one = invert_trajectory(pipe, _image(), PROMPTS[0], ts, guidance_scale=1.0, height=64, width=64)
    two = invert_trajectory(pipe, _image(), PROMPTS[0], ts, guidance_scale=2.0, height=64, width=64)
    for i, z in enumerate(spy.seen):
        assert torch.equal(z, one.at_step(i)[0])
    assert (one.at_step(0) - two.at_step(0)).abs().max().item() > 1e-3  # the guidance does matter


def test_inversion_offset_must_be_below_the_number_of_steps(tiny):
    with pytest.raises(ValueError, match="inversion_offset=3 but the run has 3 scheduler steps"):
        _run(
            tiny("tiny-sd"), "tiny-sd", PROMPTS[:2], [ac.SharedAttention(reference_image=_image(), inversion_offset=3)]
        )
    with pytest.raises(ValueError, match="inversion_guidance"):
        ac.SharedAttention(inversion_guidance=0.5)


def test_reference_image_needs_a_variance_preserving_scheduler(tiny):
    with pytest.raises(ValueError, match="variance-preserving"):
        _run(tiny("tiny-sdxl"), "tiny-sdxl", PROMPTS[:2], [ac.SharedAttention(reference_image=_image())])
    with pytest.raises(ValueError, match="does not exist"):
        ac.SharedAttention(reference_image="/nonexistent/x.png")


# ---- one control object, several runs: what a run needs lives on the run ---------------------------


@pytest.mark.parametrize(
    "kw, runs",
    [
        (
            {"reference_image": "image", "inversion_offset": 1},
            [("tiny-sd", PROMPTS[:2], {}), ("tiny-sd", PROMPTS, {"num_inference_steps": 4})],
        ),
        ({}, [("tiny-flux", PROMPTS, {}), ("tiny-flux", PROMPTS[:2], {"height": 64, "width": 32})]),  # ShiftPE by width
        ({"shared_norms": True, "reference": 1}, [("tiny-sdxl", PROMPTS, {}), ("tiny-sd", PROMPTS[:2], {})]),
    ],
)
def test_one_control_for_runs_in_a_row_is_a_fresh_control_each_time(tiny, kw, runs):
    kw = {k: _image() if v == "image" else v for k, v in kw.items()}
    reused = ac.SharedAttention(**kw)
    for name, prompts, extra in runs + runs[:1]:
        got = _run(tiny(name), name, prompts, [reused], **extra)
        fresh = _run(tiny(name), name, prompts, [ac.SharedAttention(**kw)], **extra)
        assert torch.equal(got, fresh), name
        assert (got - _run(tiny(name), name, prompts, [], **extra)).abs().max().item() > 1e-4  # it acted
    assert all(not m._forward_hooks for m in tiny("tiny-sdxl").unet.modules())  # the GroupNorm hooks are gone


# ---- command line ----------------------------------------------------------------------------------


def test_cli_prompts_file_and_shared_control(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n  a white sheep  \n")
    out = tmp_path / "style.png"
    rc = main(
        [
            "generate",
            "--prompts",
            str(prompts),
            "--model",
            "tiny-sd",
            "--steps",
            "2",
            "--seed",
            "0",
            "--control",
            "shared",
            "reference=0",
            "score_shift=0.5",
            "-o",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "style_0.png").is_file() and (tmp_path / "style_1.png").is_file()
    meta = Image.open(tmp_path / "style_1.png").text
    assert meta["prompt"] == "a white sheep" and "--prompts" in meta["command"]

    ref = tmp_path / "ref.png"
    _image().save(ref)
    rc = main(
        [
            "generate",
            "--prompts",
            str(prompts),
            "--model",
            "tiny-sd",
            "--steps",
            "2",
            "--seed",
            "0",
            "--reference-image",
            str(ref),
            "--reference-prompt",
            "a photo",
            "-o",
            str(tmp_path / "r.png"),
        ]
    )
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist"),
        ("empty", "has no prompts"),
        ("both", "not both"),
        ("noref", "does not exist"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, case, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    argv = {
        "missing": ["generate", "--prompts", str(tmp_path / "nope.txt")],
        "empty": ["generate", "--prompts", str(empty)],
        "both": ["generate", "a cat", "--prompts", str(empty)],
        "noref": ["generate", "a cat", "--reference-image", str(tmp_path / "nope.png")],
    }[case]
    rc = main(argv + ["-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err


def test_attach_says_it_needs_the_loop(tiny):
    """The reference-image injection is a loop hook, so SharedAttention runs through ControlledPipeline."""
    with pytest.raises(ValueError, match="ControlledPipeline"), ac.attach(tiny("tiny-sd"), [ac.SharedAttention()]):
        pass
