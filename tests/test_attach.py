"""`ac.attach` puts controls on an unmodified diffusers pipeline and always restores it."""

import pytest
import torch

import attnctrl as ac
from attnctrl.control import Control
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs, processors_of, stock_latents

PROMPT = "a red car and a white sheep"


class Boom(Control):
    default_layers = "cross"

    def qkv(self, call):
        raise RuntimeError("boom")


class Scale(Control):
    """Scales every attention output: proves the attached processors are really used."""

    default_layers = "self"

    def out(self, call, o):
        return o * 0.5


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_restored_after_block_and_after_exception(tiny, name):
    pipe = tiny(name)
    kw = call_kwargs(name)
    before = processors_of(pipe)
    ref = stock_latents(pipe, PROMPT, **kw)
    with ac.attach(pipe, [Scale()]):
        changed = stock_latents(pipe, PROMPT, **kw)
    assert (changed - ref).abs().max().item() > 1e-3
    with pytest.raises(RuntimeError, match="boom"), ac.attach(pipe, [Boom()]):
        stock_latents(pipe, PROMPT, **kw)
    after = processors_of(pipe)
    assert all(after[k] is before[k] for k in before)
    assert torch.equal(stock_latents(pipe, PROMPT, **kw), ref)


def test_attach_maps_equal_controlled_maps(tiny):
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd")
    with ac.attach(pipe, [ac.AttentionMaps(resolutions=[16])]) as session:
        latents = stock_latents(pipe, PROMPT, **kw)
    out = ControlledPipeline(pipe)(PROMPT, seed=0, controls=[ac.AttentionMaps(resolutions=[16])], **kw)
    assert torch.equal(latents, out.images)
    a, b = session.maps.by_res[(16, 16)], out.maps.by_res[(16, 16)]
    assert a.shape == b.shape == (1, 77, 16, 16)
    assert torch.allclose(a, b, atol=1e-6)


def test_attach_refuses_loop_level_controls(tiny):
    class Guide(Control):
        def combine(self, run, preds, guided):
            return guided

    pipe = tiny("tiny-sd")
    before = processors_of(pipe)
    with pytest.raises(ValueError, match="ControlledPipeline"), ac.attach(pipe, [Guide()]):
        pass
    assert all(processors_of(pipe)[k] is before[k] for k in before)


def test_controlled_pipeline_restores_after_exception(tiny):
    pipe = tiny("tiny-sdxl")
    before = processors_of(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        ControlledPipeline(pipe)(PROMPT, seed=0, controls=[Boom()], **call_kwargs("tiny-sdxl"))
    assert all(processors_of(pipe)[k] is before[k] for k in before)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-flux"])
def test_attach_step_state_matches_the_loop(tiny, name):
    """Under attach, the pre-forward hook derives the same StepState the ControlledPipeline loop sets."""

    class Steps(Control):
        default_layers = "cross"

        def begin(self, run):
            self.seen = []

        def qkv(self, call):
            s = call.run.state
            self.seen.append((s.index, round(s.timestep, 3), s.num_steps))

    pipe = tiny(name)
    kw = call_kwargs(name, num_inference_steps=4)
    spy = Steps()
    with ac.attach(pipe, [spy]):
        stock_latents(pipe, PROMPT, **kw)
    attached = sorted(set(spy.seen))
    ControlledPipeline(pipe)(PROMPT, seed=0, controls=[spy], **kw)
    assert attached == sorted(set(spy.seen))
    assert [s[0] for s in attached] == [0, 1, 2, 3]


def test_the_run_carries_the_facts_controls_read(tiny):
    """ControlledPipeline puts the text side, pixel size, denoiser, timesteps and the inversion on the
    run, so controls need no pipeline; attach has no prompts, so words are refused with a clear error."""
    seen = {}

    class Probe(Control):
        default_layers = "name=mid_block.attentions.0.transformer_blocks.0.attn2"

        def begin(self, run):
            seen.update(
                prompts=[run.prompt_of(i) for i in range(run.layout.images)],
                car=run.tokens(2, "car"),
                pixel=run.pixel_size,
                denoiser=run.denoiser,
                timesteps=list(run.timesteps),
                invert=run.invert,
            )

    pipe = ControlledPipeline(tiny("tiny-sd"))
    prompts = ["a red car", "a blue car and a car"]
    pipe(prompts, seed=0, controls=[Probe()], num_images_per_prompt=2, **call_kwargs("tiny-sd"))
    assert seen["prompts"] == [prompts[0], prompts[0], prompts[1], prompts[1]]  # prompt-major
    assert seen["car"] == [3]  # <bos> a blue car
    assert seen["pixel"] == (64, 64) and seen["denoiser"] is pipe.pipe.unet
    assert seen["timesteps"] == [float(t) for t in pipe.pipe.scheduler.timesteps] and callable(seen["invert"])

    class Words(Control):
        default_layers = "cross"

        def begin(self, run):
            run.tokens(0, "car")

        def qkv(self, call):
            return None

    with pytest.raises(ValueError, match="ControlledPipeline"), ac.attach(tiny("tiny-sd"), [Words()]):
        pass
