"""Disabled equals stock: ControlledPipeline reproduces the plain diffusers pipeline on every family."""

import pytest
import torch

import attnctrl as ac
from attnctrl.control import Control
from attnctrl.pipelines import ControlledPipeline
from conftest import FAMILY_MODELS, call_kwargs, stock_latents

PROMPTS = ["a red car and a white sheep", "a dog sitting on a blue bench"]


class PassThrough(Control):
    """Active on every layer but changes nothing: forces the attnctrl processor path (not delegation)."""

    name = "pass"
    default_layers = ["self", "cross"]

    def qkv(self, call):
        return None


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_no_controls_equals_stock(tiny, name):
    pipe = tiny(name)
    kw = call_kwargs(name, num_images_per_prompt=2)
    ref = stock_latents(pipe, PROMPTS, **kw)
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, **kw)
    assert out.images.shape == ref.shape
    assert (out.images - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_attention_maps_equals_stock(tiny, name):
    pipe = tiny(name)
    kw = call_kwargs(name, num_images_per_prompt=2)
    ref = stock_latents(pipe, PROMPTS, **kw)
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, controls=[ac.AttentionMaps()], **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5
    assert out.maps and out.maps.num_images == 4


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_controlled_processor_path_equals_stock(tiny, name):
    """Our re-implementation of each family's processor (QK-norm, RoPE, dual attention) matches stock."""
    pipe = tiny(name)
    kw = call_kwargs(name)
    ref = stock_latents(pipe, PROMPTS[0], **kw)
    out = ControlledPipeline(pipe)(PROMPTS[0], seed=0, controls=[PassThrough()], **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5


def test_no_cfg_and_decoded_images_equal_stock(tiny):
    pipe = tiny("tiny-sd")
    ref = pipe(
        PROMPTS[0],
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="np",
    ).images
    out = ControlledPipeline(pipe)(PROMPTS[0], seed=3, num_inference_steps=2, guidance_scale=1.0, output_type="np")
    assert abs(out.images - ref).max() <= 1e-5


def test_flux_true_cfg_matches_stock(tiny):
    """True CFG is batched with the conditional branch; the stock pipeline runs it separately."""
    pipe = tiny("tiny-flux")
    kw = call_kwargs("tiny-flux", negative_prompt="blurry", true_cfg_scale=2.0)
    ref = stock_latents(pipe, PROMPTS[0], **kw)
    out = ControlledPipeline(pipe)(PROMPTS[0], seed=0, **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5


def test_callback_on_step_end_can_replace_latents(tiny):
    pipe = tiny("tiny-sd")
    seen = []

    def cb(p, i, t, tensors):
        seen.append(i)
        return {"latents": tensors["latents"] * 0} if i == 1 else {}

    kw = call_kwargs("tiny-sd")
    out = ControlledPipeline(pipe)(PROMPTS[0], seed=0, callback_on_step_end=cb, **kw)
    ref = stock_latents(pipe, PROMPTS[0], callback_on_step_end=cb, **kw)
    assert seen == [0, 1, 2, 0, 1, 2]
    assert (out.images - ref).abs().max().item() <= 1e-5


def test_step_state_and_layout_are_set_by_the_loop(tiny):
    pipe = tiny("tiny-sd")
    log = []

    class Spy(Control):
        default_layers = "name=mid_block.attentions.0.transformer_blocks.0.attn2"

        def out(self, call, o):
            log.append((call.run.state.index, call.run.state.num_steps, call.run.layout.branches, o.shape[0]))
            return o

    ControlledPipeline(pipe)(PROMPTS, seed=0, controls=[Spy()], **call_kwargs("tiny-sd", num_inference_steps=4))
    assert [entry[0] for entry in log] == [0, 1, 2, 3]
    assert all(e[1] == 4 and e[2] == ("uncond", "cond") and e[3] == 4 for e in log)
