"""Panoramas: MultiDiffusion's views and merge (Bar-Tal et al. 2023) and MAD's merged attention
(Quattrini et al. 2024), by their stated properties and against reference implementations."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.deprecated.stable_diffusion_panorama.pipeline_stable_diffusion_panorama import (
    StableDiffusionPanoramaPipeline,
)

import attnctrl as ac
from attnctrl.panorama import make_views, merged_attention, merged_cross_attention
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs, stock_latents

PROMPT = "a red car and a white sheep"


# ------------------------------------------------------------------------------ views and weights


@pytest.mark.parametrize("height,width,circular", [(512, 2048, False), (512, 2048, True), (768, 1024, False)])
def test_views_are_diffusers_get_views(height, width, circular):
    """The view grid is MultiDiffusion's (diffusers' `get_views`, 64-latent windows, stride 8)."""
    ref = StableDiffusionPanoramaPipeline.get_views(None, height, width, 64, 8, circular_padding=circular)
    views = make_views(height // 8, width // 8, 64, 8, circular)
    assert [(h, h + 64, w, w + 64) for h, w in views.starts] == ref


@pytest.mark.parametrize(
    "size,view,stride,circular",
    [
        ((8, 40), 8, 4, False),
        ((8, 42), 8, 4, False),
        ((16, 40), 8, 4, False),
        ((8, 40), 8, 4, True),
        ((8, 40), 16, 8, True),
    ],
)
@pytest.mark.parametrize("factor", [1, 2])
def test_weights_tile_the_canvas(size, view, stride, circular, factor):
    """Every latent is in some view and its merge weights sum to exactly 1 (the Eq. 5 average)."""
    views = make_views(*size, view, stride, circular)
    n = views.tokens(factor)
    total = torch.zeros(n).index_add_(0, views.index(factor).reshape(-1), views.weights(factor).reshape(-1))
    assert torch.allclose(total, torch.ones(n), atol=1e-6)
    # merging the views of any canvas gives the canvas back
    canvas = torch.randn(2, n, 3)
    assert torch.allclose(views.merge(views.split(canvas, factor), factor), canvas, atol=1e-5)


def test_views_pinned():
    views = make_views(8, 42, 8, 4)  # 42 is not on the stride grid: a last view flush with the edge
    assert views.starts == [(0, w) for w in (0, 4, 8, 12, 16, 20, 24, 28, 32, 34)]
    ring = make_views(4, 12, 8, 4, circular=True)
    assert ring.starts == [(0, 0), (0, 4), (0, 8)]
    assert ring.index()[2, :8].tolist() == [8, 9, 10, 11, 0, 1, 2, 3]  # the last view wraps to the start
    assert ring.counts().tolist() == [2.0] * 48  # a ring has no edges: every latent is in two views
    assert make_views(4, 12, 8, 4).counts()[:12].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]


# ---------------------------------------------------------------------------- merged attention


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("factor,chunk", [(1, 4096), (1, 7), (2, 5)])
def test_mad_merged_attention_is_attention_over_the_canvas(circular, factor, chunk):
    """Views that agree where they overlap: MAD's merged self-attention equals plain attention over
    the canvas tokens, cropped to each view; cross-attention likewise (queries merged)."""
    torch.manual_seed(0)
    views = make_views(8, 24, 8, 4, circular)
    n, g, h, d = views.tokens(factor), 2, 3, 4
    q, k, v = (torch.randn(g, h, n, d) for _ in range(3))

    def as_views(x):  # (G, H, N, D) -> (G, V, H, L, D)
        return views.split(x.transpose(1, 2).reshape(g, n, h * d), factor).unflatten(-1, (h, d)).transpose(2, 3)

    ref = as_views(F.scaled_dot_product_attention(q, k, v))
    got = merged_attention(as_views(q), as_views(k), as_views(v), views, None, chunk)
    assert torch.allclose(got, ref, atol=1e-5)
    kt, vt = torch.randn(g, h, 5, d), torch.randn(g, h, 5, d)
    ref = as_views(F.scaled_dot_product_attention(q, kt, vt))
    assert torch.allclose(merged_cross_attention(as_views(q), kt, vt, views, None), ref, atol=1e-5)


# --------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("method", ["mad", "multidiffusion"])
def test_one_view_covering_the_canvas_equals_stock(tiny, name, method):
    pipe = tiny(name)
    kw = call_kwargs(name, height=64, width=96)
    ref = stock_latents(pipe, PROMPT, **kw)
    out = ControlledPipeline(pipe)(PROMPT, seed=0, controls=[ac.Panorama(method, view=48)], **kw)
    assert (out.latents - ref).abs().max().item() <= 1e-5


def _diffusers_panorama(pipe, views, circular, **kw):
    ref = StableDiffusionPanoramaPipeline(**pipe.components, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.get_views = lambda *a, **k: [(h, h + views.view_h, w, w + views.view_w) for h, w in views.starts]
    return ref(PROMPT, generator=torch.Generator().manual_seed(0), circular_padding=circular, **kw).images


@pytest.mark.parametrize("circular", [False, True])
def test_multidiffusion_matches_diffusers_panorama_pipeline(tiny, circular):
    """Our merge of the predictions equals diffusers' average of the views' DDIM steps."""
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd", height=64, width=160)
    batch = 2 if circular else None  # views in batches of 2 merge into the same canvas
    pano = ac.Panorama("multidiffusion", view=32, stride=16, circular=circular, view_batch=batch)
    out = ControlledPipeline(pipe)(PROMPT, seed=0, controls=[pano], **kw)
    views = make_views(32, 80, 32, 16, circular)
    ref = _diffusers_panorama(pipe, views, circular, **kw)
    assert len(views) == (5 if circular else 4)
    assert (out.latents - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


class _ReferenceMAD:
    """MAD's attention written as its reference processor does it: loops over the views adding into
    a canvas and dividing by the count, attention over the canvas, the canvas cut back into views."""

    def __init__(self, views, merge_self):
        self.views, self.merge_self = views, merge_self

    def _canvas(self, x, f):  # (G·V, L, C) -> (G, C, H/f, W/f), count-averaged
        v = self.views
        g, (hh, ww) = x.shape[0] // len(v), (v.view_h // f, v.view_w // f)
        x = x.reshape(g, len(v), hh, ww, -1).permute(0, 1, 4, 2, 3)
        canvas = x.new_zeros(g, x.shape[2], v.height // f, v.width // f)
        count = torch.zeros_like(canvas)
        for i, (h0, w0) in enumerate(v.starts):
            canvas[:, :, h0 // f : h0 // f + hh, w0 // f : w0 // f + ww] += x[:, i]
            count[:, :, h0 // f : h0 // f + hh, w0 // f : w0 // f + ww] += 1
        return canvas / count

    def _cut(self, canvas, f):  # (G, C, H/f, W/f) -> (G·V, L, C)
        v = self.views
        hh, ww = v.view_h // f, v.view_w // f
        parts = [canvas[:, :, h0 // f : h0 // f + hh, w0 // f : w0 // f + ww] for h0, w0 in v.starts]
        return torch.stack(parts, 1).flatten(3).transpose(2, 3).reshape(-1, hh * ww, canvas.shape[1])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        f = round((self.views.view_h * self.views.view_w / hidden_states.shape[1]) ** 0.5)
        q = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        ctx = encoder_hidden_states if cross else hidden_states
        k, v = attn.to_k(ctx), attn.to_v(ctx)
        merge = cross or self.merge_self
        heads = attn.heads

        def split(x):
            return x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

        if merge:
            q = self._canvas(q, f).flatten(2).transpose(1, 2)
            if cross:
                k, v = k[:: len(self.views)], v[:: len(self.views)]
            else:
                k, v = (self._canvas(x, f).flatten(2).transpose(1, 2) for x in (k, v))
        o = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)
        if merge:
            hh, ww = self.views.height // f, self.views.width // f
            o = self._cut(o.transpose(1, 2).reshape(o.shape[0], -1, hh, ww), f)
        return attn.to_out[1](attn.to_out[0](o))


def _reference_mad_run(pipe, views, steps, switch, guidance=7.5):
    """MAD's sampling loop: views through the UNet, a DDIM step per view, latents averaged."""
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    size = (views.height * pipe.vae_scale_factor, views.width * pipe.vae_scale_factor)
    latents = pipe.prepare_latents(1, 4, *size, cond.dtype, "cpu", torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(steps)
    text = torch.cat([uncond.expand(len(views), -1, -1), cond.expand(len(views), -1, -1)])
    originals = pipe.unet.attn_processors
    processor = _ReferenceMAD(views, True)
    pipe.unet.set_attn_processor(processor)
    try:
        for i, t in enumerate(pipe.scheduler.timesteps):
            processor.merge_self = i < switch
            crops = [latents[:, :, h : h + views.view_h, w : w + views.view_w] for h, w in views.starts]
            eps = pipe.unet(torch.cat(crops * 2), t, encoder_hidden_states=text).sample
            u, c = eps.chunk(2)
            stepped = pipe.scheduler.step(u + guidance * (c - u), t, torch.cat(crops)).prev_sample
            value, count = torch.zeros_like(latents), torch.zeros_like(latents)
            for j, (h, w) in enumerate(views.starts):
                value[:, :, h : h + views.view_h, w : w + views.view_w] += stepped[j]
                count[:, :, h : h + views.view_h, w : w + views.view_w] += 1
            latents = value / count
    finally:
        pipe.unet.set_attn_processor(originals)
    return latents


@pytest.mark.parametrize("switch,size", [(0.5, (64, 160)), (1.0, (64, 160)), (0.5, (96, 96))])
def test_mad_matches_a_reference_implementation(tiny, switch, size):
    """The whole MAD run (merged self-attention up to the switch step, merged cross-attention
    throughout, MultiDiffusion's merge) equals the paper's loop written out independently
    (a row of views, and a 2×2 grid)."""
    pipe = tiny("tiny-sd")
    steps = 4
    kw = call_kwargs("tiny-sd", height=size[0], width=size[1], num_inference_steps=steps)
    out = ControlledPipeline(pipe)(PROMPT, seed=0, controls=[ac.Panorama(view=32, stride=16, switch=switch)], **kw)
    ref = _reference_mad_run(pipe, make_views(size[0] // 2, size[1] // 2, 32, 16), steps, int(switch * steps))
    assert (out.latents - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    md = ControlledPipeline(pipe)(PROMPT, seed=0, controls=[ac.Panorama("multidiffusion", view=32, stride=16)], **kw)
    assert (md.latents - ref).abs().max().item() > 1e-2  # the reference is not MultiDiffusion


@pytest.mark.parametrize("name,method", [("tiny-sd", "mad"), ("tiny-sd", "multidiffusion"), ("tiny-sdxl", "mad")])
def test_circular_panorama_is_periodic(tiny, name, method):
    """A 360° panorama has no seam: rolling the start noise by a stride rolls the result."""
    pipe = tiny(name)
    kw = call_kwargs(name, height=64, width=128)
    pano = ac.Panorama(method, view=32, stride=16, circular=True)
    cp = ControlledPipeline(pipe)
    noise = torch.randn(1, 4, 32, 64, generator=torch.Generator().manual_seed(5))
    a = cp(PROMPT, latents=noise, controls=[pano], **kw).latents
    b = cp(PROMPT, latents=noise.roll(16, -1), controls=[pano], **kw).latents
    assert (b - a.roll(16, -1)).abs().max().item() <= 1e-4 * a.abs().max().item()
    flat = cp(PROMPT, latents=noise.roll(16, -1), controls=[ac.Panorama(method, view=32, stride=16)], **kw).latents
    assert (flat - a.roll(16, -1)).abs().max().item() > 1e-2  # without the wrap the panorama has edges


# ------------------------------------------------------------------------------------- composition


@pytest.mark.parametrize("method", ["mad", "multidiffusion"])
def test_pag_on_each_view(tiny, method):
    """PAG's perturbed branch is a branch of every view: with one view it is PAG alone."""
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd", height=64, width=96)
    cp = ControlledPipeline(pipe)
    ref = cp(PROMPT, seed=0, controls=[ac.PAG("mid", scale=2.0)], **kw).latents
    out = cp(PROMPT, seed=0, controls=[ac.PAG("mid", scale=2.0), ac.Panorama(method, view=48)], **kw).latents
    assert (out - ref).abs().max().item() <= 1e-5
    wide = cp(PROMPT, seed=0, controls=[ac.PAG("mid"), ac.Panorama(method, view=32, stride=16)], **kw)
    assert wide.latents.shape == (1, 4, 32, 48)


def test_shared_attention_across_panoramas(tiny):
    pipe = tiny("tiny-sd")
    kw = call_kwargs("tiny-sd", height=64, width=96)
    cp = ControlledPipeline(pipe)
    prompts = [PROMPT, "a dog on a bench"]
    ref = cp(prompts, seed=0, controls=[ac.SharedAttention()], **kw).latents
    pano = ac.Panorama("multidiffusion", view=48)
    out = cp(prompts, seed=0, controls=[ac.SharedAttention(), pano], **kw).latents
    assert (out - ref).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="does not compose with SharedAttention with method='mad'"):
        cp(prompts, seed=0, controls=[ac.SharedAttention(), ac.Panorama()], **kw)


@pytest.mark.parametrize("method", ["mad", "multidiffusion"])
def test_maps_over_the_whole_panorama(tiny, method):
    """The views' maps merged into the canvas: with one view they are the stock run's maps; with
    several, one map per image at every layer's canvas resolution, still a distribution over text."""
    pipe = tiny("tiny-sd")
    cp = ControlledPipeline(pipe)
    kw = call_kwargs("tiny-sd", height=64, width=96)
    ref = cp(PROMPT, seed=0, controls=[ac.AttentionMaps()], **kw).maps
    one = cp(PROMPT, seed=0, controls=[ac.AttentionMaps(), ac.Panorama(method, view=48)], **kw).maps
    assert one.resolutions == ref.resolutions
    for res in ref.resolutions:
        assert torch.allclose(one.by_res[res], ref.by_res[res], atol=1e-6)
    kw = call_kwargs("tiny-sd", height=64, width=160, num_images_per_prompt=2)
    wide = cp(PROMPT, seed=0, controls=[ac.AttentionMaps(), ac.Panorama(method, view=32, stride=16)], **kw).maps
    assert wide.resolutions == [(8, 20), (16, 40), (32, 80)]
    for m in wide.by_res.values():
        assert m.shape[0] == 2 and torch.allclose(m.sum(1), torch.ones(()), atol=1e-5)
    assert wide.word(1, "sheep").shape == (32, 80)


def test_refusals(tiny):
    cp = ControlledPipeline(tiny("tiny-sd"))
    kw = call_kwargs("tiny-sd", height=64, width=96)
    with pytest.raises(ValueError, match="does not compose with AttendExcite"):
        cp(PROMPT, seed=0, controls=[ac.Panorama(), ac.AttendExcite(tokens=["car"])], **kw)
    with pytest.raises(ValueError, match="maps need all views in one denoiser call"):
        cp(PROMPT, seed=0, controls=[ac.Panorama("multidiffusion", view_batch=1), ac.AttentionMaps()], **kw)
    with pytest.raises(ValueError, match="one ac.Panorama"):
        cp(PROMPT, seed=0, controls=[ac.Panorama(), ac.Panorama()], **kw)
    with pytest.raises(NotImplementedError, match="SD 1.x/2.x and SDXL"):
        ControlledPipeline(tiny("tiny-sd3"))(PROMPT, seed=0, controls=[ac.Panorama()], **call_kwargs("tiny-sd3"))
    with pytest.raises(ValueError, match="not ac.attach"), ac.attach(tiny("tiny-sd"), [ac.Panorama()]):
        tiny("tiny-sd")(PROMPT, num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match="view_batch is for multidiffusion"):
        ac.Panorama("mad", view_batch=2)
    with pytest.raises(ValueError, match="divisible by the stride"):
        cp(PROMPT, seed=0, controls=[ac.Panorama(view=16, stride=10, circular=True)], **kw)
    with pytest.raises(ValueError, match="not divisible by the layer factor 4"):  # before any step
        cp(PROMPT, seed=0, controls=[ac.Panorama(view=16, stride=6)], **kw)


# --------------------------------------------------------------------------------------- command line


def test_cli_panorama_with_the_default_model_reproduces(tmp_path, capsys, monkeypatch):
    """`--panorama mad` on the default (Shapes) model: a wide PNG whose recorded command regenerates it."""
    import json
    import shlex

    import numpy as np
    from PIL import Image

    from attnctrl.cli import main

    monkeypatch.chdir(tmp_path)
    argv = ["generate", "a red circle", "--width", "128", "--steps", "2", "--seed", "1", "--panorama", "mad"]
    assert main(argv + ["-o", "a.png"]) == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (128, 64)
        params, first = json.loads(im.text["attnctrl"]), np.asarray(im.convert("RGB")).copy()
    assert params["controls"] == [{"name": "panorama", "args": {"method": "mad"}}]
    again = shlex.split(params["command"])[1:] + ["-o", "b.png"]
    assert main(again) == 0
    with Image.open(tmp_path / "b.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), first)
    assert main(argv + ["--control", "panorama", "-o", "c.png"]) == 2
    assert "give --panorama or --control panorama, not both" in capsys.readouterr().err


def test_the_app_runs_a_panorama():
    """The app's panel (built from the registry) runs a panorama with its heatmap gallery."""
    from attnctrl.app.runner import ModelCache, Request, run_request

    req = Request("a red circle and a blue square", seed=0, steps=2, width=128, controls=[("panorama", ["method=mad"])])
    res = run_request(req, ModelCache())
    assert res.images[0].size == (128, 64) and res.baseline[0].size == (128, 64)
    assert "--control panorama method=mad" in res.cli
    assert [t[1] for t in res.heatmaps] == ["a", "red", "circle", "and", "a#2", "blue", "square"]
