"""Image-conditioned pipeline kinds for the UNet families: img2img and inpainting.

Each kind is a mixin over a family adapter that changes only where the run starts (timesteps cut by
`strength`, latents from the init image) and what a row of the denoiser input carries; encoding,
guidance, the scheduler step and decoding stay the family's. Mirrors diffusers'
`StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline` `__call__`, reusing their methods.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from .base import Prepared
from .sd import SDAdapter
from .sdxl import SDXLAdapter

#: per-row inputs a 9-channel inpainting UNet takes as extra input channels, in the stock order
MASK_CHANNELS = ("_mask", "_masked_image_latents")


def strength_timesteps(pipe, kw: dict, device):
    """The scheduler's timesteps, cut to the last `strength` of the run by the pipeline's `get_timesteps`."""
    timesteps, steps = retrieve_timesteps(
        pipe.scheduler, kw["num_inference_steps"], device, kw.get("timesteps"), kw.get("sigmas")
    )
    timesteps, steps = pipe.get_timesteps(steps, kw["strength"], device)
    if steps < 1:
        raise ValueError(
            f"strength {kw['strength']} leaves {steps} of the {kw['num_inference_steps']} steps: "
            "pass a larger strength or more steps"
        )
    return timesteps, steps


class Img2ImgKind:
    """Start from the init image noised to the first of the timesteps `strength` keeps."""

    kind = "img2img"
    required: tuple[str, ...] = ("image",)

    def _start(self, pipe, kw: dict, prompts: int, n: int, h, w, dtype, device):
        image = pipe.image_processor.preprocess(kw["image"])
        timesteps, steps = strength_timesteps(pipe, kw, device)
        latent_timestep = timesteps[:1].repeat(prompts * n)
        latents = kw.get("latents")  # SDXL img2img takes given latents as they are
        if latents is None:
            latents = pipe.prepare_latents(image, latent_timestep, prompts, n, dtype, device, kw.get("generator"))
        return timesteps, steps, latents, {}, {}


class InpaintKind:
    """Inpainting: a 9-channel UNet reads the mask and the masked image's latents as extra input
    channels of every row (so extra branches get them too); a 4-channel UNet keeps the unmasked
    region on the init image's latents, re-noised to the next timestep after each step."""

    kind = "inpaint"
    required: tuple[str, ...] = ("image", "mask_image")

    def _start(self, pipe, kw: dict, prompts: int, n: int, h, w, dtype, device):
        timesteps, steps = strength_timesteps(pipe, kw, device)
        rows = prompts * n
        latent_timestep = timesteps[:1].repeat(rows)
        init_image = pipe.image_processor.preprocess(kw["image"], height=h, width=w, resize_mode="default")
        init_image = init_image.to(dtype=torch.float32)
        if type(pipe.vae).__name__ == "AsymmetricAutoencoderKL":  # its decoder reads the mask and image
            raise NotImplementedError("attnctrl does not support inpainting with an AsymmetricAutoencoderKL yet")
        unet_channels = pipe.unet.config.in_channels
        if unet_channels not in (4, 9):
            raise ValueError(f"an inpainting UNet has 4 or 9 input channels, not {unet_channels}")
        generator = kw.get("generator")
        out = pipe.prepare_latents(
            rows,
            pipe.vae.config.latent_channels,
            h,
            w,
            dtype,
            device,
            generator,
            kw.get("latents"),
            image=init_image,
            timestep=latent_timestep,
            is_strength_max=kw["strength"] == 1.0,
            return_noise=True,
            return_image_latents=unet_channels == 4,
        )
        latents, noise = out[0], out[1]
        condition = pipe.mask_processor.preprocess(kw["mask_image"], height=h, width=w, resize_mode="default")
        masked = kw.get("masked_image_latents")
        if masked is None and not (self.family == "sdxl" and init_image.shape[1] == 4):  # type: ignore[attr-defined]
            masked = init_image * (condition < 0.5)
        mask, masked_latents = pipe.prepare_mask_latents(condition, masked, rows, h, w, dtype, device, generator, False)
        if unet_channels == 9 and masked_latents is not None:
            return timesteps, steps, latents, {"_mask": mask, "_masked_image_latents": masked_latents}, {}
        return timesteps, steps, latents, {}, {"image_latents": out[2], "noise": noise, "mask": mask}

    def predict(self, pipe, x, t, rows, shared):
        if MASK_CHANNELS[0] in rows:
            rows = dict(rows)
            x = torch.cat([x, *(rows.pop(k) for k in MASK_CHANNELS)], dim=1)
        return super().predict(pipe, x, t, rows, shared)

    def after_step(self, pipe, prep: Prepared, i: int, latents: torch.Tensor) -> torch.Tensor:
        if not prep.kind:
            return latents
        init = prep.kind["image_latents"]
        if i < len(prep.timesteps) - 1:
            init = pipe.scheduler.add_noise(init, prep.kind["noise"], torch.tensor([prep.timesteps[i + 1]]))
        mask = prep.kind["mask"]
        return (1 - mask) * init + mask * latents


class SDImg2ImgAdapter(Img2ImgKind, SDAdapter):
    pass


class SDInpaintAdapter(InpaintKind, SDAdapter):
    unsupported = SDAdapter.unsupported + ("padding_mask_crop",)


class XLImageTimeIds:
    """SDXL img2img / inpainting time ids: sizes from the start latents, aesthetic scores when the
    pipeline's config asks for them (`requires_aesthetics_score`), negative sizes defaulting to the positive."""

    def _time_ids(self, pipe, kw: dict, h, w, latents, dtype, proj_dim):
        size = (latents.shape[-2] * pipe.vae_scale_factor, latents.shape[-1] * pipe.vae_scale_factor)
        original = kw.get("original_size") or size
        target = kw.get("target_size") or size
        negative_original = kw.get("negative_original_size")
        negative_target = kw.get("negative_target_size")
        return pipe._get_add_time_ids(
            original,
            kw["crops_coords_top_left"],
            target,
            kw["aesthetic_score"],
            kw["negative_aesthetic_score"],
            original if negative_original is None else negative_original,
            kw["negative_crops_coords_top_left"],
            target if negative_target is None else negative_target,
            dtype=dtype,
            text_encoder_projection_dim=proj_dim,
        )


class SDXLImg2ImgAdapter(Img2ImgKind, XLImageTimeIds, SDXLAdapter):
    unsupported = SDXLAdapter.unsupported + ("denoising_start",)


class SDXLInpaintAdapter(InpaintKind, XLImageTimeIds, SDXLAdapter):
    unsupported = SDXLAdapter.unsupported + ("denoising_start", "padding_mask_crop")
