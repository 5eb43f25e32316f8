"""Stable Diffusion XL adapter (mirrors `StableDiffusionXLPipeline.__call__`)."""

from __future__ import annotations

import torch

from .base import Prepared, prompt_list
from .sd import SDAdapter


class SDXLAdapter(SDAdapter):
    family = "sdxl"
    unsupported = SDAdapter.unsupported + ("denoising_end",)

    def prepare(self, pipe, kw) -> Prepared:
        h, w, cfg = self._common(pipe, kw)
        pipe._denoising_end = None
        pe_in = kw.get("prompt_embeds")
        prompts = prompt_list(kw["prompt"], None if pe_in is None else pe_in.shape[0])
        device = pipe._execution_device
        n = kw["num_images_per_prompt"]
        lora_scale = (kw.get("cross_attention_kwargs") or {}).get("scale")
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=kw["prompt"],
            prompt_2=kw.get("prompt_2"),
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=cfg,
            negative_prompt=kw.get("negative_prompt"),
            negative_prompt_2=kw.get("negative_prompt_2"),
            prompt_embeds=pe_in,
            negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"),
            lora_scale=lora_scale,
            clip_skip=kw.get("clip_skip"),
        )
        timesteps, steps, latents, per_row, kind = self._start(pipe, kw, len(prompts), n, h, w, pe.dtype, device)
        proj_dim = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids, neg_time_ids = self._time_ids(pipe, kw, h, w, latents, pe.dtype, proj_dim)
        rows = len(prompts) * n

        def branch(embeds, pooled_embeds, ids):
            added = {"text_embeds": pooled_embeds.to(device), "time_ids": ids.to(device).repeat(rows, 1)}
            return {"encoder_hidden_states": embeds.to(device), "added_cond_kwargs": added, **per_row}

        shared = {"timestep_cond": self._timestep_cond(pipe, kw["guidance_scale"], rows, latents)}
        if kw.get("cross_attention_kwargs"):
            shared["cross_attention_kwargs"] = kw["cross_attention_kwargs"]
        return Prepared(
            latents=latents,
            timesteps=timesteps,
            num_steps=steps,
            cond=branch(pe, pooled, time_ids),
            uncond=branch(npe, npooled, neg_time_ids) if cfg else None,
            shared=shared,
            guidance_scale=kw["guidance_scale"],
            guidance_rescale=kw.get("guidance_rescale", 0.0),
            grid=tuple(latents.shape[-2:]),
            prompts=prompts,
            images=rows,
            extra_step=pipe.prepare_extra_step_kwargs(kw.get("generator"), kw.get("eta", 0.0)),
            num_warmup=max(len(timesteps) - steps * pipe.scheduler.order, 0),
            kind=kind,
        )

    def _start(self, pipe, kw: dict, prompts: int, n: int, h, w, dtype, device):
        out = super()._start(pipe, kw, prompts, n, h, w, dtype, device)
        if hasattr(pipe.scheduler, "set_begin_index"):  # text-to-image starts at the first timestep
            pipe.scheduler.set_begin_index(0)
        return out

    def _time_ids(self, pipe, kw: dict, h, w, latents, dtype, proj_dim):
        """(time ids, negative time ids) of one image, as `StableDiffusionXLPipeline.__call__` makes them."""
        original_size = kw.get("original_size") or (h, w)
        target_size = kw.get("target_size") or (h, w)
        time_ids = pipe._get_add_time_ids(
            original_size,
            kw.get("crops_coords_top_left", (0, 0)),
            target_size,
            dtype=dtype,
            text_encoder_projection_dim=proj_dim,
        )
        if kw.get("negative_original_size") is not None and kw.get("negative_target_size") is not None:
            neg_time_ids = pipe._get_add_time_ids(
                kw["negative_original_size"],
                kw.get("negative_crops_coords_top_left", (0, 0)),
                kw["negative_target_size"],
                dtype=dtype,
                text_encoder_projection_dim=proj_dim,
            )
        else:
            neg_time_ids = time_ids
        return time_ids, neg_time_ids

    def decode(self, pipe, prep, latents, output_type):
        if output_type == "latent":
            return latents, None
        needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if needs_upcasting:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        cfg = pipe.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if needs_upcasting:
            pipe.vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type), None
