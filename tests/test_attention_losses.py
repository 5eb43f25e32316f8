"""AttendExcite, AStar and Conform: parity with diffusers' Attend-and-Excite, neutral ⇒ stock, errors."""

import copy
import math
import warnings

import pytest
import torch

import attnctrl as ac
from attnctrl.controls.attention_loss import eot_index, pads_apart
from attnctrl.controls.registry import parse_control
from attnctrl.pipelines import ControlledPipeline
from attnctrl.plan import build_plan
from attnctrl.state import BatchLayout, RunContext, StepState
from attnctrl.tokens import TokenError, resolve
from conftest import call_kwargs, stock_latents

PROMPTS = ["a cat and a frog", "a red car and a white sheep"]


def _reference_pipeline(pipe):
    from diffusers import StableDiffusionAttendAndExcitePipeline

    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = StableDiffusionAttendAndExcitePipeline(**parts, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_attend_excite_matches_diffusers_pipeline(tiny):
    """Same seed, steps, token indices, thresholds: final latents within 1e-4, batch of two prompts.

    Threshold 0.0195 at step 0 makes the refinement stop part-way (the tiny model's peaks are ~0.02),
    so the reference's stopping rule is exercised, not only its iteration bound.
    """
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd", guidance_scale=7.5)
    words = [("cat", "frog"), ("car", "sheep")]
    indices = [[resolve(pipe.tokenizer, p, w)[0] for w in ws] for p, ws in zip(PROMPTS, words)]
    thresholds = {0: 0.0195, 2: 0.05}
    ref = _reference_pipeline(pipe)(
        PROMPTS,
        token_indices=indices,
        generator=torch.Generator().manual_seed(0),
        attn_res=(16, 16),
        thresholds=thresholds,
        max_iter_to_alter=25,
        **kw,
    ).images
    # tokens given as words: each prompt resolves its own indices
    control = _PerPromptWords(words, resolution=16, steps=(0, 25), thresholds=thresholds)
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, controls=[control], **kw).images
    assert (out - ref).abs().max().item() <= 1e-4
    assert (out - stock_latents(pipe, PROMPTS, **kw)).abs().max().item() > 1e-2


class _PerPromptWords(ac.AttendExcite):
    """AttendExcite with different subject words per prompt (the reference takes per-prompt indices)."""

    def __init__(self, words, **kw):
        super().__init__(tokens=list(words[0]), **kw)
        self.words = words

    def prompt_specs(self, index, prompt):
        return list(self.words[index])


@pytest.mark.parametrize(
    "control",
    [
        ac.AttendExcite(tokens=[]),
        ac.AStar(tokens=["car", "sheep"], segregation=0.0, retention=0.0),
        ac.AStar(tokens=[]),
        ac.Conform(groups=[]),
    ],
    ids=["excite-no-tokens", "astar-zero-weights", "astar-no-tokens", "conform-no-groups"],
)
def test_neutral_settings_equal_stock(tiny, control):
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd")
    out = ControlledPipeline(pipe)(PROMPTS[1], seed=0, controls=[control], **kw).images
    assert (out - stock_latents(pipe, PROMPTS[1], **kw)).abs().max().item() <= 1e-5


# ---- one latent update, recomputed independently ------------------------------------------------
#
# The test below re-derives every update z ← z − α_i ∇L(z) from scratch: the cross-attention maps
# come from a plain explicit-softmax attention processor written here (not attnctrl's) on a float64
# copy of the UNet, the preprocessing and the equations are written out again, NT-Xent is
# pytorch-metric-learning's, and the gradient is torch.autograd's. Only the latents before and after
# each update are read from the run.


class _ExplicitAttention:
    """Stock attention written out (q·kᵀ·scale → softmax → ·v); keeps the cross-attention
    probabilities of the layers whose query length is `lq`, as (B, H, Lq, T)."""

    def __init__(self, store: list, lq: int):
        self.store, self.lq = store, lq

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert attention_mask is None and attn.group_norm is None and attn.spatial_norm is None
        assert hidden_states.ndim == 3 and not attn.residual_connection and attn.rescale_output_factor == 1.0
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        b, h = hidden_states.shape[0], attn.heads
        q, k, v = (
            x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)
            for x in (attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx))
        )
        p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        if cross and p.shape[2] == self.lq:
            self.store.append(p)
        o = (p @ v).transpose(1, 2).reshape(b, -1, h * v.shape[-1])
        return attn.to_out[1](attn.to_out[0](o))


def _raw_maps(unet, z, t, cond, res):
    """(res, res, T) cross-attention maps at latents `z`: mean over the layers at `res` and their heads.

    `unet` is a private copy (DDIM's scale_model_input is the identity, so z goes in as it is)."""
    store: list = []
    unet.set_attn_processor(_ExplicitAttention(store, res * res))
    unet(z, t, encoder_hidden_states=cond)
    assert store, f"no cross-attention layer at {res}×{res}"
    total = sum(p[0].sum(0) for p in store)  # Σ over layers and heads of the one conditional row
    return (total / sum(p.shape[1] for p in store)).reshape(res, res, -1)


def _kernel(size=3, sigma=0.5):
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((x / (2 * sigma)) ** 2))  # the A&E reference's exponent
    k = g[:, None] * g[None, :]
    return k / k.sum()


def _preprocess(raw, indices, softmax=True, pixel_softmax=False, last=-1):
    """A&E / CONFORM preprocessing of (H, W, T) maps: tokens 1..T−2 (softmax ×100; with `last`, the
    tokens 1..last−1 only), smoothing 3/0.5, optionally a softmax ×100 over each map's pixels."""
    text = raw[..., 1:last]
    if softmax:
        text = (100 * text).softmax(-1)
    maps = torch.stack([text[..., i - 1] for i in indices])
    x = torch.nn.functional.pad(maps[:, None], (1, 1, 1, 1), mode="reflect")
    maps = torch.nn.functional.conv2d(x, _kernel().to(x)[None, None])[:, 0]
    if pixel_softmax:
        maps = (100 * maps.flatten(1)).softmax(-1).view_as(maps)
    return maps


def _eq2(a):  # Σ over pairs m > n of Σmin / Σsum
    return sum(torch.min(a[m], a[n]).sum() / (a[m] + a[n]).sum() for m in range(len(a)) for n in range(m))


def _mask(a):  # B: ≥ half of each map's peak
    return (a >= 0.5 * a.flatten(1).max(1).values[:, None, None]).float()


def _eq3(a, b):  # Σ over subjects of 1 − Σmin / Σsum
    return sum(1 - torch.min(a[m], b[m]).sum() / (a[m] + b[m]).sum() for m in range(len(a)))


def _ntxent(groups_labels):
    from pytorch_metric_learning.losses import NTXentLoss

    loss = NTXentLoss(temperature=0.5)

    def fn(a, prev):
        emb, labels = a.flatten(1), list(groups_labels)
        if prev is not None:  # the previous step's maps are positives of their own group
            emb, labels = torch.cat([emb, prev.flatten(1)]), labels + list(groups_labels)
        return loss(emb, torch.tensor(labels))

    return fn


_PROMPT = "a red car and a white sheep"
_UPDATE_CASES = {
    # control, words, loss(a, previous maps), preprocessing kwargs
    "astar-segregation": (
        lambda: ac.AStar(tokens=["red", "car", "sheep"], retention=0.0),
        ["red", "car", "sheep"],
        lambda a, prev: _eq2(a),
        {},
    ),
    "astar-retention": (
        lambda: ac.AStar(tokens=["car", "sheep"], segregation=0.0),
        ["car", "sheep"],
        lambda a, prev: None if prev is None else _eq3(a, _mask(prev)),
        {},
    ),
    "astar": (
        lambda: ac.AStar(tokens=["car", "sheep"]),
        ["car", "sheep"],
        lambda a, prev: _eq2(a) + (0 if prev is None else _eq3(a, _mask(prev))),
        {},
    ),
    "conform": (
        lambda: ac.Conform(groups=[["red", "car"], ["white", "sheep"]], refinement_steps=()),
        ["red", "car", "white", "sheep"],
        _ntxent([0, 0, 1, 1]),
        {"softmax": False},
    ),
    "conform-softmaxes": (
        lambda: ac.Conform(
            groups=[["red", "car"], ["sheep"]],
            refinement_steps=(),
            softmax_normalize=True,
            softmax_normalize_attention_maps=True,
        ),
        ["red", "car", "sheep"],
        _ntxent([0, 0, 1]),
        {"softmax": True, "pixel_softmax": True},
    ),
}


@pytest.mark.parametrize("case", list(_UPDATE_CASES))
def test_each_update_is_z_minus_alpha_grad_of_the_equation_and_descends(tiny, case):
    make, words, loss_fn, prep_kw = _UPDATE_CASES[case]
    pipe = tiny("tiny-sd")
    T = 3
    control, trace = make(), []
    run_step = control.before_step

    def capture(run, latents, denoise):
        out = run_step(run, latents, denoise)
        trace.append((run.state.index, latents.detach().clone(), out.detach().clone()))
        return out

    control.before_step = capture
    ControlledPipeline(pipe)(_PROMPT, seed=0, controls=[control], **call_kwargs("tiny-sd", num_inference_steps=T))
    assert [i for i, _, _ in trace] == [0, 1, 2]

    tok = pipe.tokenizer
    ids = tok(_PROMPT).input_ids
    indices = [ids.index(tok.convert_tokens_to_ids(w + "</w>")) for w in words]
    unet = copy.deepcopy(pipe.unet).to(torch.float64)
    with torch.no_grad():
        cond = pipe.encode_prompt(_PROMPT, "cpu", 1, False)[0].to(torch.float64)
    pipe.scheduler.set_timesteps(T)
    res = pipe.unet.config.sample_size // 4  # default maps resolution: latent grid / 4

    def loss_at(z, t, prev):
        return loss_fn(_preprocess(_raw_maps(unet, z, t, cond, res), indices, **prep_kw), prev)

    prev = None
    for i, z_in, z_out in trace:
        t = pipe.scheduler.timesteps[i]
        alpha = 20 * math.sqrt(1.0 - 0.5 * i / (T - 1))  # A&E: 20·sqrt(linspace(1, 0.5, T))[i]
        z = z_in.to(torch.float64).requires_grad_(True)
        with torch.enable_grad():
            loss = loss_at(z, t, prev)
        if loss is None:  # retention alone at step 0: nothing to retain yet, no update
            assert i == 0 and torch.equal(z_out, z_in)
        else:
            (grad,) = torch.autograd.grad(loss, z)
            step = alpha * grad
            assert step.abs().max().item() > 1e-5  # the update is not trivially zero
            # Tolerance. The reference here is float64; the run is float32: z_out is rounded to float32
            # (≤ half an ulp of |z|, bounded by eps·max|z|), and its gradient went through a float32
            # UNet (relative error ~1e-6; 1e-4 of the step leaves room for AVX2 vs AVX-512 kernels).
            # A wrong α, sign, weight, reduction or map is off by far more than that.
            err = ((z - step) - z_out.to(torch.float64)).abs().max().item()
            ulp = torch.finfo(torch.float32).eps * z_in.abs().max().item()
            assert err <= 1e-4 * step.abs().max().item() + ulp, (i, err, step.abs().max().item(), ulp)
            with torch.no_grad():  # in float64 the decrease (≈ α·|∇L|²) is far above rounding
                after = loss_at(z_out.to(torch.float64), t, prev).item()
            assert after < loss.item(), (i, loss.item(), after)  # the update lowers the loss it followed
        with torch.no_grad():  # the maps this step measured become the next step's "previous"
            prev = _preprocess(_raw_maps(unet, z_in.to(torch.float64), t, cond, res), indices, **prep_kw)


def _sd2_like(pipe):
    """tiny-sd with an OpenCLIP-style tokenizer: pads with "!" (id 0) instead of its end token."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from attnctrl.models.tiny import tokenizer_dir

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir("clip"), model_max_length=77, pad_token="!")
    parts = {**pipe.components, "tokenizer": tok}
    out = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def test_normalize_eot_is_detected_from_the_tokenizer():
    from transformers import CLIPTokenizer

    from attnctrl.models.tiny import clip_tokenizer, tokenizer_dir

    sd1 = clip_tokenizer()  # pads with <|endoftext|>
    sd2 = CLIPTokenizer.from_pretrained(tokenizer_dir("clip"), model_max_length=77, pad_token="!")
    assert sd1.pad_token == sd1.eos_token == "<|endoftext|>" and not pads_apart(sd1)
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0 and pads_apart(sd2)
    # BOS a cat and a frog EOT: the end token is at 6
    assert eot_index(sd2, "a cat and a frog") == 6
    assert eot_index(sd2, " ".join(["cat"] * 100)) == 76  # truncated at 77 positions


@pytest.mark.parametrize("forced", [None, True, False])
def test_sd2_maps_are_renormalised_over_the_prompt_tokens_only(tiny, forced):
    """On an SD 2.x-like model the softmax runs over positions 1..EOT−1 (A&E's normalize_eot)."""
    sd2 = _sd2_like(tiny("tiny-sd"))
    seen = []

    class Spy(ac.AStar):
        def subject_maps(self, run, maps, image):
            out = super().subject_maps(run, maps, image)
            seen.append((run.store[self]["normalize_eot"], maps[image].detach().clone(), out.detach().clone()))
            return out

    prompt = "a red car and a white sheep"  # BOS a red car and a white sheep EOT: car 3, sheep 7, EOT 8
    ControlledPipeline(sd2)(
        prompt,
        seed=0,
        controls=[Spy(tokens=["car", "sheep"], normalize_eot=forced)],
        **call_kwargs("tiny-sd", num_inference_steps=2),
    )
    flag, raw, maps = seen[0]
    assert flag is (forced is not False)
    eot = _preprocess(raw, [3, 7], last=8)
    full = _preprocess(raw, [3, 7])
    assert (eot - full).abs().max().item() > 1e-3  # the two normalisations differ on this model
    assert torch.allclose(maps, eot if flag else full, atol=1e-6, rtol=1e-5)


def test_sd1_tokenizer_keeps_the_reference_normalisation(tiny):
    pipe = tiny("tiny-sd")
    seen = []

    class Spy(ac.AStar):
        def subject_maps(self, run, maps, image):
            seen.append(run.store[self]["normalize_eot"])
            return super().subject_maps(run, maps, image)

    ControlledPipeline(pipe)(
        PROMPTS[1], seed=0, controls=[Spy(tokens=["car", "sheep"])], **call_kwargs("tiny-sd", num_inference_steps=1)
    )
    assert seen and not any(seen)  # as diffusers' A&E pipeline (the parity test above)


def test_normalize_eot_refuses_indices_past_the_prompt(tiny):
    sd2 = _sd2_like(tiny("tiny-sd"))
    with pytest.raises(ValueError, match="normalize_eot"):
        ControlledPipeline(sd2)(PROMPTS[1], seed=0, controls=[ac.AStar(tokens=[3, 8])], **call_kwargs("tiny-sd"))


def _run_at(state=None) -> RunContext:
    """A bare run at step `state`, for calling a loss on hand-made maps."""
    return RunContext(family="sd", layout=BatchLayout.build(1, False), grid=(2, 2), state=state)


def test_conform_previous_maps_are_positives_of_their_own_group():
    """Groups [red, car] and [sheep]; the previous step's maps join their own group as positives."""
    from pytorch_metric_learning.losses import NTXentLoss

    e1, e2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    current = torch.stack([e1, e1, e2])  # red, car, sheep
    prev = current.clone()

    class WithPrevious(ac.Conform):
        def previous_maps(self, run, image):
            return prev

    c = WithPrevious(groups=[["red", "car"], ["sheep"]], temperature=0.5)
    loss = c.image_loss(_run_at(), current, 0).item()
    # cosines are 1 within a group and 0 across, so s/τ = 2 or 0. Group 0 = {red, car, red', car'}:
    # 12 ordered positive pairs, each against 2 negatives (sheep, sheep'): −log(e²/(e² + 2)).
    # Group 1 = {sheep, sheep'}: 2 pairs, each against 4 negatives: −log(e²/(e² + 4)). Mean of 14.
    want = (12 * math.log(1 + 2 * math.exp(-2)) + 2 * math.log(1 + 4 * math.exp(-2))) / 14
    assert loss == pytest.approx(want, rel=1e-6)
    assert loss == pytest.approx(0.2671318, abs=1e-6)
    emb = torch.cat([current, prev]).flatten(1)
    assert loss == pytest.approx(NTXentLoss(temperature=0.5)(emb, torch.tensor([0, 0, 1, 0, 0, 1])).item(), rel=1e-6)
    # had the previous maps been given classes of their own (negatives of every current map), the value differs
    as_negatives = NTXentLoss(temperature=0.5)(emb, torch.tensor([0, 0, 1, 2, 2, 3])).item()
    assert abs(loss - as_negatives) > 1e-2
    # without previous maps: group 0 only, 2 pairs against 1 negative: −log(e²/(e² + 1))
    alone = ac.Conform(groups=[["red", "car"], ["sheep"]], previous=False).image_loss(_run_at(), current, 0).item()
    assert alone == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_conform_defaults_follow_the_authors_notebook():
    c = ac.Conform(groups=[["red", "car"], ["sheep"]])
    assert c.softmax_scale is None and not c.softmax_normalize_attention_maps  # softmax_normalize=False
    assert c.smoothing and (c.kernel_size, c.sigma) == (3, 0.5) and c.temperature == 0.5
    assert c.optimizer.refinement == {0: None, 10: None, 20: None} and c.optimizer.max_refinement == 20
    assert (c.optimizer.scale_factor, c.optimizer.scale_range) == (20.0, (1.0, 0.5))
    assert c.step_range(50) == (0, 30) and c.step_range(20) == (0, 30)  # max_iter_to_alter = 30, absolute
    on = parse_control(
        "conform",
        [
            "groups=red car;sheep",
            "softmax_normalize=true",
            "smoothing=false",
            "softmax_normalize_attention_maps=on",
            "steps=0,25",
        ],
    )
    assert on.softmax_scale == 100.0 and not on.smoothing and on.softmax_normalize_attention_maps
    assert on.step_range(50) == (0, 25)


def test_astar_loss_is_eq2_plus_eq3_against_the_previous_steps_masks():
    """AStar.image_loss on hand-made 2×2 maps: L = w_seg·Eq.2(current) + w_ret·Eq.3(current, B(previous))."""
    current = torch.tensor([[[0.6, 0.2], [0.0, 0.2]], [[0.1, 0.3], [0.4, 0.2]]])  # car, sheep
    previous = torch.tensor([[[0.1, 0.9], [0.0, 0.0]], [[0.0, 0.0], [0.3, 0.2]]])
    # B (≥ half the peak): car [[0,1],[0,0]] (peak .9), sheep [[0,0],[1,1]] (peak .3) — not the
    # current maps' own masks ([[1,0],[0,0]] and [[0,1],[1,1]]), so a mask taken from the wrong maps shows

    class WithPrevious(ac.AStar):
        def previous_maps(self, run, image):
            return previous

    def loss(index, **kw):
        run = _run_at(StepState(index, 500.0, 10))
        return WithPrevious(tokens=["car", "sheep"], **kw).image_loss(run, current, 0).item()

    # Eq. 2: Σmin(car, sheep) = .1+.2+0+.2 = .5, Σ(car+sheep) = 2 → .25
    # Eq. 3: car 1 − .2/(1 + 1) = .9; sheep 1 − (.4+.2)/(1 + 2) = .8; Σ = 1.7
    assert loss(1) == pytest.approx(0.25 + 1.7)
    assert loss(1, segregation=2.0, retention=0.5) == pytest.approx(2 * 0.25 + 0.5 * 1.7)
    assert loss(1, reduction="mean") == pytest.approx(0.25 + 1.7 / 2)
    assert loss(0) == pytest.approx(0.25)  # step 0: nothing to retain
    assert loss(1, segregation=0.0) == pytest.approx(1.7)
    # soft-IoU variant: car a = [[1, 1/3], [0, 1/3]]: Σa·B = 1/3, Σ(a + B − a·B) = 5/3 + 1 − 1/3 → 1 − 1/7
    #                   sheep a = [[1/4, 3/4], [1, 1/2]]: Σa·B = 3/2, Σ(a+B−aB) = 5/2 + 2 − 3/2 → 1 − 1/2
    assert loss(1, segregation=0.0, retention_form="soft-iou") == pytest.approx((1 - 1 / 7) + 0.5)


def test_astar_defaults_are_the_papers_equations_at_every_step():
    a = ac.AStar(tokens=["car", "sheep"])
    assert (a.reduction, a.retention_form, a.threshold) == ("sum", "paper", 0.5)
    assert a.step_range(50) == (0, 50)  # segregation at every step, as retention
    old = parse_control("astar", ["tokens=car,sheep", "reduction=mean", "retention_form=soft-iou", "steps=0,0.5"])
    assert (old.reduction, old.retention_form, old.step_range(50)) == ("mean", "soft-iou", (0, 25))
    with pytest.raises(ValueError, match="reduction"):
        ac.AStar(tokens=["car"], reduction="max")
    with pytest.raises(ValueError, match="retention_form"):
        ac.AStar(tokens=["car"], retention_form="iou")


def test_retention_compares_with_the_previous_step_and_runs_the_whole_trajectory(tiny):
    pipe = tiny("tiny-sd")
    seen = []

    class Spy(ac.AStar):
        def image_loss(self, run, maps, image):
            seen.append((run.state.index, self.previous_maps(run, image) is not None))
            return super().image_loss(run, maps, image)

    spy = Spy(tokens=["car", "sheep"], segregation=0.0, steps=(0, 0.5))
    ControlledPipeline(pipe)(PROMPTS[1], seed=0, controls=[spy], **call_kwargs("tiny-sd", num_inference_steps=4))
    # step 0 only measures (nothing to retain yet); steps 1..3 each update once against the previous maps
    assert seen == [(0, False), (1, True), (2, True), (3, True)]


def test_one_control_serves_runs_in_a_row_as_fresh_ones(tiny):
    """Per-run state (subjects, summed maps, the previous step's maps) lives on the run: an AStar
    used for a second run with other prompts and another batch gives what a fresh one gives, and
    the control object is left as it was."""
    pipe = ControlledPipeline(tiny("tiny-sd"))
    kw = call_kwargs("tiny-sd")
    second = ["a white sheep behind a red car", PROMPTS[1]]  # "car", "sheep" at other token positions
    make = lambda: ac.AStar(tokens=["car", "sheep"])
    reused = make()
    before = dict(vars(reused))
    first = pipe(PROMPTS[1], seed=0, controls=[reused], **kw).images
    again = pipe(second, seed=0, controls=[reused], **kw).images
    assert vars(reused).keys() == before.keys() and all(vars(reused)[k] is v for k, v in before.items())
    assert torch.equal(first, pipe(PROMPTS[1], seed=0, controls=[make()], **kw).images)
    assert torch.equal(again, pipe(second, seed=0, controls=[make()], **kw).images)
    assert (again - stock_latents(pipe.pipe, second, **kw)).abs().max().item() > 1e-3  # the control acts


def test_maps_only_at_the_chosen_resolution(tiny):
    pipe = ControlledPipeline(tiny("tiny-sd"))
    grid = pipe.default_grid()
    default = build_plan([ac.AttendExcite(tokens=["car"])], pipe.layers(), grid)
    res16 = build_plan([ac.AttendExcite(tokens=["car"], resolution=16)], pipe.layers(), grid)
    by_name = {layer.name: layer for layer in pipe.layers()}
    assert {by_name[n].resolution(grid) for n in default} == {grid[0] // 4}
    assert {by_name[n].resolution(grid) for n in res16} == {16}
    assert all(by_name[n].kind == "cross" for n in [*default, *res16])
    with pytest.raises(ValueError, match="no cross-attention layer at resolution 12"):
        build_plan([ac.AttendExcite(tokens=["car"], resolution=12)], pipe.layers(), grid)


def test_main_pass_stays_on_sdpa(tiny):
    """Explicit probabilities are computed only in the gradient passes, conditional rows only."""
    pipe = tiny("tiny-sd")
    shapes = []

    class Probe(ac.AttendExcite):
        def probs(self, call, p):
            shapes.append((torch.is_grad_enabled(), p.shape[0]))
            return super().probs(call, p)

    ControlledPipeline(pipe)(
        PROMPTS[1], seed=0, controls=[Probe(tokens=["car"], thresholds={})], **call_kwargs("tiny-sd")
    )
    assert shapes and all(grad and rows == 1 for grad, rows in shapes)


def test_sdxl_runs_and_composes_with_maps(tiny):
    pipe = tiny("tiny-sdxl")
    kw = call_kwargs("tiny-sdxl")
    out = ControlledPipeline(pipe)(
        PROMPTS[1], seed=0, controls=[ac.AStar(tokens=["car", "sheep"]), ac.AttentionMaps()], **kw
    )
    assert out.maps is not None and out.maps.word(0, "sheep").shape[0] > 0
    assert (out.images - stock_latents(pipe, PROMPTS[1], **kw)).abs().max().item() > 1e-4


def test_unknown_word_fails_before_any_step(tiny):
    pipe = tiny("tiny-sd")
    steps = []
    with pytest.raises(TokenError, match="'dog' is not a word"):
        ControlledPipeline(pipe)(
            PROMPTS[1],
            seed=0,
            controls=[ac.AStar(tokens=["car", "dog"])],
            callback_on_step_end=lambda *a: steps.append(a) or {},
            **call_kwargs("tiny-sd"),
        )
    assert steps == []


def test_joint_attention_families_are_refused_before_any_step(tiny):
    with pytest.raises(NotImplementedError, match="joint attention"):
        ControlledPipeline(tiny("tiny-sd3"))(
            PROMPTS[1], seed=0, controls=[ac.AttendExcite(tokens=["car"])], **call_kwargs("tiny-sd3")
        )


def test_overlapping_groups_are_refused():
    with pytest.raises(ValueError, match="must not overlap"):
        ac.Conform(groups=[["red", "car"], ["car", "sheep"]])


def test_command_line_forms():
    a = parse_control("astar", ["tokens=car,sheep", "retention=0.5"])
    assert a.tokens == ["car", "sheep"] and a.retention == 0.5
    c = parse_control("conform", ["groups=green glasses;yellow clock", "temperature=0.2"])
    assert c.groups == [["green", "glasses"], ["yellow", "clock"]] and c.temperature == 0.2
    e = parse_control("attend-excite", ["tokens=cat,frog", "thresholds=0:0.1,10:0.6"])
    assert e.thresholds == {0: 0.1, 10: 0.6}
    assert e.optimizer.refinement == pytest.approx({0: 0.9, 10: 0.4})
    assert parse_control("attend-excite", ["tokens=cat", "thresholds="]).optimizer.refinement == {}


def test_attend_excite_defaults_follow_the_reference():
    """diffusers' pipeline updates while ``i < max_iter_to_alter = 25`` (absolute steps), at any T."""
    c = ac.AttendExcite(tokens=["cat"])
    assert c.step_range(50) == (0, 25) and c.step_range(30) == (0, 25)
    assert c.normalize_eot is None and ac.AttendExcite(tokens=["cat"], normalize_eot=True).normalize_eot is True
