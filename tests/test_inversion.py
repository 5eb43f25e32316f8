"""DDIM inversion (`attnctrl.inversion`): round trips, shapes, bad input."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image

import attnctrl as ac
from attnctrl.inversion import invert_latents, invert_trajectory
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs

PROMPT = "a red car"


def _clean_latents(pipe, name):
    kw = {k: v for k, v in call_kwargs(name).items() if k != "guidance_scale"}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images  # a tiny model's "image" latents


def _regenerate(pipe, name, z_T, steps):
    kw = {k: v for k, v in call_kwargs(name).items() if k not in ("num_inference_steps", "guidance_scale")}
    return pipe(PROMPT, latents=z_T, num_inference_steps=steps, guidance_scale=1.0, **kw).images


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def pndm_pipe(base):
    """`base` (tiny-sd) sampling with PNDM as SD 1.x ships it (``skip_prk_steps=True``)."""
    pipe = type(base)(**base.components)
    pipe.scheduler = PNDMScheduler.from_config(base.scheduler.config, skip_prk_steps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def ddim_inversion_by_hand(pipe, z0, prompt, num_steps, guidance=1.0):
    """{t: z_t} for DDIM's own `num_steps` timesteps, written out from DDIM (Song et al. Eq. 12,
    σ = 0) solved for z_t: s = t − 1000/N (ᾱ_s = final_alpha_cumprod below 0), ε = ε(z_s, t) with
    CFG ε_u + w(ε_c − ε_u) when w > 1 (uncond = the empty prompt, as the SD pipeline encodes it)."""
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(num_steps)
    stride = ddim.config.num_train_timesteps // num_steps
    a = ddim.alphas_cumprod.double()
    pe, npe = pipe.encode_prompt(prompt, "cpu", 1, True)
    z, out = z0, {}
    for t in sorted(int(t) for t in ddim.timesteps):
        s = t - stride
        a_t, a_s = a[t], (a[s] if s >= 0 else ddim.final_alpha_cumprod.double())
        if guidance > 1.0:
            eu, ec = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([npe, pe])).sample.chunk(2)
            eps = (eu + guidance * (ec - eu)).double()
        else:
            eps = pipe.unet(z, t, encoder_hidden_states=pe).sample.double()
        x0 = (z.double() - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        z = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps).float()
        out[t] = z
    return out


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
    res = ac.ddim_invert(
        ControlledPipeline(pipe), None, PROMPT, num_inference_steps=2, latents=z0, fixed_point_iterations=40
    )
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


def test_invert_trajectory_on_ddim_timesteps_is_ddim_invert(tiny):
    pipe = tiny("tiny-sd")
    z0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = ac.ddim_invert(pipe, None, PROMPT, num_inference_steps=4, latents=z0, guidance_scale=2.0)
    res = invert_trajectory(pipe, None, PROMPT, ref.timesteps, guidance_scale=2.0, latents=z0)
    assert torch.equal(res.timesteps, ref.timesteps)
    assert all(torch.equal(a, b) for a, b in zip(res.latents_trajectory, ref.latents_trajectory, strict=True))


def test_invert_trajectory_under_pndm_steps_between_ddim_timesteps(tiny):
    """PNDM's list repeats a timestep ([667, 334, 334, 1] for 3 steps): the stride is still DDIM's
    1000/3, not 1000/4, and both steps at 334 get z_334 (before: 1000 // len(timesteps), so the
    inverted latents were off by up to 0.54 at t=901 with 10 steps)."""
    pipe = pndm_pipe(tiny("tiny-sd"))
    pipe.scheduler.set_timesteps(3)
    ts = pipe.scheduler.timesteps
    assert ts.tolist() == [667, 334, 334, 1]
    z0 = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    res = invert_trajectory(pipe, None, PROMPT, ts, latents=z0)
    by_hand = ddim_inversion_by_hand(pipe, z0, PROMPT, 3)
    assert len(res.latents_trajectory) == len(ts) + 1
    for i, t in enumerate(ts.tolist()):
        assert (res.at_step(i) - by_hand[t]).abs().max().item() <= 1e-5, (i, t)
    assert torch.equal(res.at_step(1), res.at_step(2)) and torch.equal(res.at_step(len(ts)), z0)


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
    z = torch.zeros(1, 4, 32, 32)
    with pytest.raises(ValueError, match="variance-preserving"):  # Euler: sigma-space latents
        invert_trajectory(tiny("tiny-sdxl"), None, PROMPT, torch.tensor([667.0, 334.0, 1.0]), latents=z)
    with pytest.raises(ValueError, match="descending"):
        invert_trajectory(tiny("tiny-sd"), None, PROMPT, torch.tensor([1, 334]), latents=z)
    with pytest.raises(ValueError, match="integer timesteps"):
        invert_trajectory(tiny("tiny-sd"), None, PROMPT, torch.tensor([667.5, 1.0]), latents=z)
