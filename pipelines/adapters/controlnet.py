"""ControlNet for SD 1.x / 2.x (mirrors `StableDiffusionControlNetPipeline.__call__`).

The control image is a per-row input, so every branch row (extra branches included) gets it and
the ControlNet runs on the whole batch it is given, its residuals added to the UNet's as stock does;
the conditioning scale times the `control_guidance_start/end` window is a per-step shared input.
"""

from __future__ import annotations

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from .base import Prepared
from .sd import SDAdapter


def keep_scales(scale, start, end, steps: int) -> list[float]:
    """The conditioning scale of each step: `scale` inside [start, end] of the run, 0 outside (stock's rule)."""
    s = start[0] if isinstance(start, list) else start
    e = end[0] if isinstance(end, list) else end
    scale = scale[0] if isinstance(scale, list) else scale
    return [scale * (1.0 - float(i / steps < s or (i + 1) / steps > e)) for i in range(steps)]


class ControlNetKind:
    """One `ControlNetModel`; guess mode and Multi-ControlNet are refused (`check`)."""

    kind = "controlnet"
    required: tuple[str, ...] = ("image",)

    def _start(self, pipe, kw: dict, prompts: int, n: int, h, w, dtype, device):
        from diffusers.models import ControlNetModel

        net = getattr(pipe.controlnet, "_orig_mod", pipe.controlnet)
        if not isinstance(net, ControlNetModel):
            raise NotImplementedError(f"attnctrl runs one ControlNetModel, not {type(net).__name__}")
        if kw.get("guess_mode") or net.config.global_pool_conditions:
            raise NotImplementedError("attnctrl does not support ControlNet guess mode yet")
        image = pipe.prepare_image(
            image=kw["image"],
            width=kw.get("width"),  # the caller's size: None keeps the control image's, as stock
            height=kw.get("height"),
            batch_size=prompts * n,
            num_images_per_prompt=n,
            device=device,
            dtype=net.dtype,
            do_classifier_free_guidance=False,
        )
        h, w = image.shape[-2:]
        timesteps, steps = retrieve_timesteps(
            pipe.scheduler, kw["num_inference_steps"], device, kw.get("timesteps"), kw.get("sigmas")
        )
        latents = pipe.prepare_latents(
            prompts * n, pipe.unet.config.in_channels, h, w, dtype, device, kw.get("generator"), kw.get("latents")
        )
        scales = keep_scales(
            kw["controlnet_conditioning_scale"],
            kw["control_guidance_start"],
            kw["control_guidance_end"],
            len(timesteps),
        )
        return timesteps, steps, latents, {"_controlnet_cond": image}, {"controlnet_scales": scales}

    def step_inputs(self, prep: Prepared, i: int) -> dict:
        return {"_controlnet_scale": prep.kind["controlnet_scales"][i]}

    def predict(self, pipe, x, t, rows, shared):
        rows, shared = dict(rows), dict(shared)
        cond, scale = rows.pop("_controlnet_cond"), shared.pop("_controlnet_scale")
        down, mid = pipe.controlnet(
            x,
            t,
            encoder_hidden_states=rows["encoder_hidden_states"],
            controlnet_cond=cond,
            conditioning_scale=scale,
            guess_mode=False,
            return_dict=False,
        )
        return pipe.unet(
            x,
            t,
            **rows,
            **shared,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]


class SDControlNetAdapter(ControlNetKind, SDAdapter):
    pass
