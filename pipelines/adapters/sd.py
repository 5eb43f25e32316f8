"""Stable Diffusion 1.x / 2.x adapter (mirrors `StableDiffusionPipeline.__call__`)."""

from __future__ import annotations

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from .base import Adapter, Prepared, prompt_list


def default_size(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


class SDAdapter(Adapter):
    family = "sd"
    unsupported: tuple[str, ...] = ("ip_adapter_image", "ip_adapter_image_embeds", "callback", "callback_steps")

    @staticmethod
    def _timesteps_and_latents(pipe, kw: dict, rows: int, h: int, w: int, dtype, device):
        """The scheduler's timesteps and the start latents, as the stock SD / SDXL `__call__` makes them."""
        timesteps, steps = retrieve_timesteps(
            pipe.scheduler, kw["num_inference_steps"], device, kw.get("timesteps"), kw.get("sigmas")
        )
        latents = pipe.prepare_latents(
            rows, pipe.unet.config.in_channels, h, w, dtype, device, kw.get("generator"), kw.get("latents")
        )
        return timesteps, steps, latents

    def _start(self, pipe, kw: dict, prompts: int, n: int, h: int, w: int, dtype, device):
        """Timesteps, start latents, extra per-row model inputs and kind-specific tensors (`Prepared.kind`).

        Text-to-image here; the image-conditioned kinds (`adapters.image_kinds`) override it."""
        timesteps, steps, latents = self._timesteps_and_latents(pipe, kw, prompts * n, h, w, dtype, device)
        return timesteps, steps, latents, {}, {}

    def _timestep_cond(self, pipe, guidance_scale, n, latents):
        if pipe.unet.config.time_cond_proj_dim is None:
            return None
        g = torch.tensor(guidance_scale - 1).repeat(n)
        emb = pipe.get_guidance_scale_embedding(g, embedding_dim=pipe.unet.config.time_cond_proj_dim)
        return emb.to(device=latents.device, dtype=latents.dtype)

    def _common(self, pipe, kw):
        """Size, flags and timesteps shared by SD and SDXL."""
        h, w = kw.get("height"), kw.get("width")  # img2img has neither
        if not h or not w:
            h, w = default_size(pipe)
        pipe._guidance_scale = kw["guidance_scale"]
        pipe._guidance_rescale = kw.get("guidance_rescale", 0.0)
        pipe._clip_skip = kw.get("clip_skip")
        pipe._cross_attention_kwargs = kw.get("cross_attention_kwargs")
        pipe._interrupt = False
        cfg = kw["guidance_scale"] > 1 and pipe.unet.config.time_cond_proj_dim is None
        return h, w, cfg

    def prepare(self, pipe, kw) -> Prepared:
        h, w, cfg = self._common(pipe, kw)
        prompt = kw["prompt"]
        pe_in = kw.get("prompt_embeds")
        prompts = prompt_list(prompt, None if pe_in is None else pe_in.shape[0])
        device = pipe._execution_device
        n = kw["num_images_per_prompt"]
        lora_scale = (kw.get("cross_attention_kwargs") or {}).get("scale")
        pe, npe = pipe.encode_prompt(
            prompt,
            device,
            n,
            cfg,
            kw.get("negative_prompt"),
            prompt_embeds=pe_in,
            negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            lora_scale=lora_scale,
            clip_skip=kw.get("clip_skip"),
        )
        timesteps, steps, latents, per_row, kind = self._start(pipe, kw, len(prompts), n, h, w, pe.dtype, device)
        shared = {"timestep_cond": self._timestep_cond(pipe, kw["guidance_scale"], len(prompts) * n, latents)}
        if kw.get("cross_attention_kwargs"):
            shared["cross_attention_kwargs"] = kw["cross_attention_kwargs"]
        return Prepared(
            latents=latents,
            timesteps=timesteps,
            num_steps=steps,
            cond={"encoder_hidden_states": pe, **per_row},
            uncond={"encoder_hidden_states": npe, **per_row} if cfg else None,
            shared=shared,
            guidance_scale=kw["guidance_scale"],
            guidance_rescale=kw.get("guidance_rescale", 0.0),
            grid=tuple(latents.shape[-2:]),
            prompts=prompts,
            images=len(prompts) * n,
            extra_step=pipe.prepare_extra_step_kwargs(kw.get("generator"), kw.get("eta", 0.0)),
            decode={"generator": kw.get("generator"), "dtype": pe.dtype},
            num_warmup=len(timesteps) - steps * pipe.scheduler.order,
            kind=kind,
        )

    def model_input(self, pipe, x, t):
        return pipe.scheduler.scale_model_input(x, t) if hasattr(pipe.scheduler, "scale_model_input") else x

    def predict(self, pipe, x, t, rows, shared):
        return pipe.unet(x, t, **rows, **shared, return_dict=False)[0]

    def decode(self, pipe, prep, latents, output_type):
        if output_type == "latent":
            return latents, None
        image = pipe.vae.decode(
            latents / pipe.vae.config.scaling_factor, return_dict=False, generator=prep.decode["generator"]
        )[0]
        image, nsfw = pipe.run_safety_checker(image, latents.device, prep.decode["dtype"])
        denorm = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denorm), nsfw
