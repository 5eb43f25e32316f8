"""DDIM inversion (`attnctrl.inversion`): round trips, shapes, bad input."""
import numpy as np
import pytest
import torch
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs
from diffusers import DDIMScheduler
from PIL import Image

import attnctrl as ac
from attnctrl.inversion import invert_latents

PROMPT = "a red car"


def _clean_latents(pipe, name):
    kw = {k: v for k, v in call_kwargs(name).items() if k != "guidance_scale"}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images  # a tiny model's "image" latents


def _regenerate(pipe, name, z_T, steps):
    kw = {k: v for k, v in call_kwargs(name).items() if k not in ("num_inference_steps", "guidance_scale")}
    return pipe(PROMPT, latents=z_T, num_inference_steps=steps, guidance_scale=1.0, **kw).images


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("steps", [3, 10])
def test_round_trip_of_latents_reconstructs_them(tiny, steps):
    """Invert tiny-sd latents, regenerate with the same prompt, CFG 1, DDIM: relative error <= 1e-2.

    The random tiny UNet's ε changes too fast between z_s and z_t for plain DDIM inversion (about 7%
    here), so ε is re-evaluated at the new point (fixed-point DDIM inversion)."""
    pipe = tiny("tiny-sd")
    z0 = _clean_latents(pipe, "tiny-sd")
    res = ac.ddim_invert(pipe, None, PROMPT, num_inference_steps=steps, latents=z0, fixed_point_iterations=5)
    assert len(res.latents_trajectory) == steps + 1 and torch.equal(res.latents_trajectory[0], z0)
    assert _rel(_regenerate(pipe, "tiny-sd", res.zT, steps), z0) <= 1e-2


def test_round_trip_sdxl_with_ddim_from_config(tiny):
    base = tiny("tiny-sdxl")
    pipe = type(base)(**base.components)
    pipe.scheduler = DDIMScheduler.from_config(base.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    z0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    # the random tiny SDXL UNet needs many fixed-point iterations to converge (plain: 0.59 at 3 steps)
    res = ac.ddim_invert(ControlledPipeline(pipe), None, PROMPT, num_inference_steps=2, latents=z0, fixed_point_iterations=40)
    assert _rel(_regenerate(pipe, "tiny-sdxl", res.zT, 2), z0) <= 1e-2


def test_plain_inversion_is_ddim_step_reversed(tiny):
    """One step, no fixed point: z_t = √ᾱ_t x̂0 + √(1−ᾱ_t) ε(z_0, t), written out here."""
    pipe = tiny("tiny-sd")
    z0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    res = ac.ddim_invert(pipe, None, PROMPT, num_inference_steps=1, latents=z0)
    t = int(res.timesteps[0])
    (pe, _) = pipe.encode_prompt(PROMPT, "cpu", 1, False)
    with torch.no_grad():
        eps = pipe.unet(z0, t, encoder_hidden_states=pe).sample.double()
    a_t, a_s = pipe.scheduler.alphas_cumprod[t].double(), pipe.scheduler.final_alpha_cumprod.double()
    expected = a_t.sqrt() * (z0.double() - (1 - a_s).sqrt() * eps) / a_s.sqrt() + (1 - a_t).sqrt() * eps
    assert torch.allclose(res.zT.double(), expected, atol=1e-5)
    assert torch.equal(res.at_step(0), res.zT)


def test_image_goes_through_the_vae(tiny):
    pipe = tiny("tiny-sd")
    img = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    res = ac.ddim_invert(pipe, img, PROMPT, num_inference_steps=2)
    assert [tuple(z.shape) for z in res.latents_trajectory] == [(1, 4, 32, 32)] * 3
    assert res.prompt == PROMPT and all(torch.isfinite(z).all() for z in res.latents_trajectory)


def test_bad_input(tiny):
    with pytest.raises(NotImplementedError, match="SD and SDXL"):
        ac.ddim_invert(tiny("tiny-flux"), None, PROMPT, latents=torch.zeros(1, 16, 4, 4))
    with pytest.raises(ValueError, match="prompt"):
        invert_latents(tiny("tiny-sd"), torch.zeros(1, 4, 32, 32), " ", torch.tensor([1]))
    with pytest.raises(ValueError, match="image"):
        ac.ddim_invert(tiny("tiny-sd"), None, PROMPT)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ac.ddim_invert(tiny("tiny-sd"), None, PROMPT, num_inference_steps=0, latents=torch.zeros(1, 4, 32, 32))
