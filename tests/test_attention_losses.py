"""AttendExcite, AStar and Conform: parity with diffusers' Attend-and-Excite, neutral ⇒ stock, errors."""
import warnings

import pytest
import torch

import attnctrl as ac
from attnctrl.controls.registry import parse_control
from attnctrl.pipelines import ControlledPipeline
from attnctrl.plan import build_plan
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
        PROMPTS, token_indices=indices, generator=torch.Generator().manual_seed(0), attn_res=(16, 16),
        thresholds=thresholds, max_iter_to_alter=25, **kw,
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


@pytest.mark.parametrize(
    "control",
    [
        ac.AStar(tokens=["car", "sheep"], retention=0.0),
        ac.AStar(tokens=["car", "sheep"], segregation=0.0, retention_steps=(0, 1.0)),
        ac.Conform(groups=[["red", "car"], ["white", "sheep"]]),
    ],
    ids=["segregation", "retention", "conform"],
)
def test_each_loss_moves_the_latents(tiny, control):
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd")
    out = ControlledPipeline(pipe)(PROMPTS[1], seed=0, controls=[control], **kw).images
    assert (out - stock_latents(pipe, PROMPTS[1], **kw)).abs().max().item() > 1e-4


def test_retention_compares_with_the_previous_step_and_runs_the_whole_trajectory(tiny):
    pipe = tiny("tiny-sd")
    seen = []

    class Spy(ac.AStar):
        def image_loss(self, maps, image, state):
            seen.append((state.index, self.previous_maps(image) is not None))
            return super().image_loss(maps, image, state)

    spy = Spy(tokens=["car", "sheep"], segregation=0.0, steps=(0, 0.5))
    ControlledPipeline(pipe)(PROMPTS[1], seed=0, controls=[spy], **call_kwargs("tiny-sd", num_inference_steps=4))
    # step 0 only measures (nothing to retain yet); steps 1..3 each update once against the previous maps
    assert seen == [(0, False), (1, True), (2, True), (3, True)]


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

    ControlledPipeline(pipe)(PROMPTS[1], seed=0, controls=[Probe(tokens=["car"], thresholds={})], **call_kwargs("tiny-sd"))
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
            PROMPTS[1], seed=0, controls=[ac.AStar(tokens=["car", "dog"])],
            callback_on_step_end=lambda *a: steps.append(a) or {}, **call_kwargs("tiny-sd"),
        )
    assert steps == []


def test_joint_attention_families_are_refused_before_any_step(tiny):
    with pytest.raises(NotImplementedError, match="joint attention"):
        ControlledPipeline(tiny("tiny-sd3"))(PROMPTS[1], seed=0, controls=[ac.AttendExcite(tokens=["car"])], **call_kwargs("tiny-sd3"))


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
