"""Pipeline kinds beyond text-to-image: disabled equals stock, controls run, extra branches get every row input."""

import functools

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPAGImg2ImgPipeline,
    StableDiffusionPAGInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from test_bf16 import CONTROLS as BF16_CONTROLS

import attnctrl as ac
from attnctrl.pipelines import ControlledPipeline
from conftest import _cached, call_kwargs

PROMPTS = ["a red car and a white sheep", "a dog sitting on a blue bench"]
SIZE = 64  # the tiny models' pixel size


def init_image() -> Image.Image:
    g = torch.Generator().manual_seed(7)
    pixels = (torch.rand(SIZE, SIZE, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def mask_image() -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[:, : SIZE // 2] = 255
    return Image.fromarray(m)


def _inpaint_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The tiny SD UNet's architecture with 9 input channels (latents, mask, masked image), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20)
        return UNet2DConditionModel.from_config({**unet.config, "in_channels": 9}).eval()


CLASSES = {
    "sd": {
        "img2img": (StableDiffusionImg2ImgPipeline, StableDiffusionPAGImg2ImgPipeline),
        "inpaint": (StableDiffusionInpaintPipeline, StableDiffusionPAGInpaintPipeline),
    },
    "sdxl": {
        "img2img": (StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPAGImg2ImgPipeline),
        "inpaint": (StableDiffusionXLInpaintPipeline, StableDiffusionXLPAGInpaintPipeline),
    },
}
#: family-kind; "inpaint9" is inpainting with a 9-channel UNet (latents, mask, masked-image latents)
KINDS = [f"{f}-{k}" for f in ("sd", "sdxl") for k in ("img2img", "inpaint", "inpaint9")]


@functools.cache
def kind_pipe(name: str, pag: bool = False):
    family, kind = name.split("-")
    parts = _cached(f"tiny-{family}").components
    if kind == "inpaint9":
        parts = {**parts, "unet": _inpaint_unet(parts["unet"])}
    plain, with_pag = CLASSES[family][kind.rstrip("9")]
    pipe = with_pag(**parts, pag_applied_layers=["mid"]) if pag else plain(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kind_kwargs(kind: str, **extra) -> dict:
    kw = call_kwargs(f"tiny-{kind.split('-')[0]}", **{"num_inference_steps": 4, "image": init_image(), **extra})
    if "inpaint" in kind:
        kw.setdefault("mask_image", mask_image())
        kw.setdefault("strength", 0.75)
    return kw


def stock(pipe, prompt, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_no_controls_equals_stock(kind, guidance):
    pipe = kind_pipe(kind)
    kw = kind_kwargs(kind, num_images_per_prompt=2, guidance_scale=guidance)
    ref = stock(pipe, PROMPTS, **kw)
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, **kw)
    assert out.images.shape == ref.shape
    assert (out.images - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_decoded_images_equal_stock(kind):
    pipe = kind_pipe(kind)
    kw = kind_kwargs(kind, output_type="np")
    ref = stock(pipe, PROMPTS[0], **kw)
    out = ControlledPipeline(pipe)(PROMPTS[0], seed=0, **kw)
    assert abs(out.images - ref).max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_attention_maps_are_distributions_over_text_and_change_nothing(kind):
    pipe = kind_pipe(kind)
    kw = kind_kwargs(kind, num_images_per_prompt=2)
    ref = stock(pipe, PROMPTS, **kw)
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, controls=[ac.AttentionMaps()], **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5
    assert out.maps.num_images == 4
    for (h, w), m in out.maps.by_res.items():
        assert (m >= 0).all()
        assert torch.allclose(m.sum(1), torch.ones(4, h, w), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_pag_matches_diffusers_pag_pipeline_of_the_kind(kind):
    """diffusers' PAG img2img / inpaint pipelines give the perturbed rows the conditional branch's
    inputs (for a 9-channel UNet: its mask and masked-image channels); so must the extra branch here."""
    kw = kind_kwargs(kind)
    pag = kind_pipe(kind, pag=True)
    processors = pag.unet.attn_processors
    try:
        ref = stock(pag, PROMPTS[0], pag_scale=2.0, **kw)
    finally:  # diffusers' SDXL PAG inpainting returns latents before it restores the UNet's processors
        pag.unet.set_attn_processor(processors)
    out = ControlledPipeline(kind_pipe(kind))(PROMPTS[0], seed=0, controls=[ac.PAG("mid", scale=2.0)], **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5
    assert (out.images - stock(kind_pipe(kind), PROMPTS[0], **kw)).abs().max().item() > 1e-3


@pytest.mark.parametrize("controls", [[], [ac.PAG(scale=2.0)], [ac.AttentionMaps()]])
@pytest.mark.parametrize("kind", ["sd-inpaint", "sdxl-inpaint"])
def test_four_channel_inpainting_keeps_the_unmasked_region_on_the_init_latents(kind, controls):
    """After the last step the kept (black) half is the init image's latents exactly, whatever the
    controls: the VAE's sample of the init image is the generator's first draw, as in stock."""
    pipe = kind_pipe(kind)
    out = ControlledPipeline(pipe)(PROMPTS[0], seed=0, controls=controls, **kind_kwargs(kind))
    image = pipe.image_processor.preprocess(init_image(), height=SIZE, width=SIZE)
    init = pipe._encode_vae_image(image, generator=torch.Generator().manual_seed(0))
    half = SIZE // 4  # the latent grid is SIZE // 2 wide; the mask's right half is 0 (keep)
    assert torch.equal(out.images[..., half:], init[..., half:])
    assert (out.images[..., :half] - init[..., :half]).abs().max().item() > 1e-2  # the white half was repainted


def test_missing_image_and_panorama_are_refused_before_work():
    pipe = ControlledPipeline(kind_pipe("sd-inpaint"))
    with pytest.raises(ValueError, match="mask_image"):
        pipe(PROMPTS[0], image=init_image(), num_inference_steps=2)
    with pytest.raises(NotImplementedError, match="text-to-image"):
        pipe(PROMPTS[0], controls=[ac.Panorama(view=32)], **kind_kwargs("sd-inpaint"))


# ---- ControlNet (SD) ---------------------------------------------------------------------------


@functools.cache
def controlnet_pipe(pag: bool = False):
    from diffusers import ControlNetModel, StableDiffusionControlNetPAGPipeline, StableDiffusionControlNetPipeline

    parts = _cached("tiny-sd").components
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(30)
        # one stride-2 conditioning block: the tiny VAE's scale factor is 2
        net = ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(8, 16)).eval()
        # from_unet zero-initialises the output convolutions: random ones make the control image count
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.2)
    parts = {**parts, "controlnet": net}
    if pag:
        pipe = StableDiffusionControlNetPAGPipeline(**parts, pag_applied_layers=["mid"])
    else:
        pipe = StableDiffusionControlNetPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controlnet_kwargs(**extra) -> dict:
    return call_kwargs("tiny-sd", **{"num_inference_steps": 4, "image": init_image(), **extra})


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"guidance_scale": 1.0},
        {"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.25, "control_guidance_end": 0.75},
        {"output_type": "np"},
    ],
)
def test_controlnet_no_controls_equals_stock(extra):
    pipe = controlnet_pipe()
    kw = controlnet_kwargs(num_images_per_prompt=2, **extra)
    ref = stock(pipe, PROMPTS, **kw)
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, **kw)
    assert abs(out.images - ref).max() <= 1e-5


def test_controlnet_at_scale_zero_is_the_text_to_image_run():
    """Zero residuals (scale 0, or every step outside the guidance window) leave the plain UNet."""
    kw = controlnet_kwargs()
    plain = stock(_cached("tiny-sd"), PROMPTS[0], **{k: v for k, v in kw.items() if k != "image"})
    off = ControlledPipeline(controlnet_pipe())(PROMPTS[0], seed=0, controlnet_conditioning_scale=0.0, **kw)
    outside = ControlledPipeline(controlnet_pipe())(PROMPTS[0], seed=0, control_guidance_start=1.0, **kw)
    on = ControlledPipeline(controlnet_pipe())(PROMPTS[0], seed=0, **kw)
    assert (off.images - plain).abs().max().item() <= 1e-6
    assert (outside.images - plain).abs().max().item() <= 1e-6
    assert (on.images - plain).abs().max().item() > 1e-3  # the tiny ControlNet's residuals are not zero


def test_controlnet_maps_and_pag():
    """Maps are distributions over text; PAG equals diffusers' ControlNet PAG pipeline, whose
    perturbed rows get the control image and residuals as the conditional rows do."""
    kw = controlnet_kwargs(controlnet_conditioning_scale=0.8)
    out = ControlledPipeline(controlnet_pipe())(PROMPTS[0], seed=0, controls=[ac.AttentionMaps()], **kw)
    assert (out.images - stock(controlnet_pipe(), PROMPTS[0], **kw)).abs().max().item() <= 1e-5
    for (h, w), m in out.maps.by_res.items():
        assert torch.allclose(m.sum(1), torch.ones(1, h, w), atol=1e-5)
    pag = controlnet_pipe(pag=True)
    processors = pag.unet.attn_processors
    try:
        ref = stock(pag, PROMPTS[0], pag_scale=2.0, **kw)
    finally:
        pag.unet.set_attn_processor(processors)
    out = ControlledPipeline(controlnet_pipe())(PROMPTS[0], seed=0, controls=[ac.PAG("mid", scale=2.0)], **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["sd-inpaint9", "controlnet"])
def test_latent_updates_predict_with_the_kinds_row_inputs(kind):
    """Attend-and-Excite's gradient step calls the denoiser itself: with the mask channels (9 input
    channels) for inpainting, through the ControlNet for ControlNet — every call, batched or not."""
    pipe = controlnet_pipe() if kind == "controlnet" else kind_pipe(kind)
    kw = controlnet_kwargs() if kind == "controlnet" else kind_kwargs(kind)
    seen = []
    hooks = [pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(("unet", args[0].shape[1])))]
    if kind == "controlnet":
        hooks.append(pipe.controlnet.register_forward_pre_hook(lambda m, args: seen.append(("net", args[0].shape[0]))))
    try:
        out = ControlledPipeline(pipe)(PROMPTS[0], seed=0, controls=[ac.AttendExcite(tokens=["car", "sheep"])], **kw)
    finally:
        for h in hooks:
            h.remove()
    assert torch.isfinite(out.images).all()
    unet_calls = [c for w, c in seen if w == "unet"]
    assert len(unet_calls) > len(pipe.scheduler.timesteps)  # the updates' own calls happened
    if kind == "controlnet":
        assert len([c for w, c in seen if w == "net"]) == len(unet_calls)  # one ControlNet call per UNet call
    else:
        assert set(unet_calls) == {9}


@pytest.mark.slow  # 77 runs, about 90 s on one core
@pytest.mark.parametrize("kind", [*KINDS, "controlnet"])
@pytest.mark.parametrize("control", sorted(BF16_CONTROLS))
def test_every_control_runs_on_every_kind(kind, control):
    """Each control of the suite's list runs end to end on the kind: finite latents of the stock shape."""
    pipe = controlnet_pipe() if kind == "controlnet" else kind_pipe(kind)
    kw = controlnet_kwargs() if kind == "controlnet" else kind_kwargs(kind, strength=0.75)
    out = ControlledPipeline(pipe)(
        PROMPTS[0], seed=0, controls=[BF16_CONTROLS[control]()], num_images_per_prompt=2, **kw
    )
    assert out.images.shape == (2, 4, SIZE // 2, SIZE // 2)
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan")])
def test_strength_outside_0_1_is_refused_before_work(strength):
    with pytest.raises(ValueError, match="strength must be a finite number from 0 to 1"):
        ControlledPipeline(kind_pipe("sd-img2img")).check_call(PROMPTS[0], image=init_image(), strength=strength)
