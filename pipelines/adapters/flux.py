"""FLUX adapter (mirrors `FluxPipeline.__call__`).

FLUX.1-dev/schnell are guidance-distilled: there is no unconditional branch unless the user
asks for true CFG (``true_cfg_scale > 1`` with a negative prompt); then the negative prompt is
the "uncond" branch and is batched with the others (the stock pipeline runs it as a separate
forward pass; results agree to float rounding).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from .base import Adapter, Prepared, prompt_list


class FluxAdapter(Adapter):
    family = "flux"
    unsupported = (
        "ip_adapter_image",
        "ip_adapter_image_embeds",
        "negative_ip_adapter_image",
        "negative_ip_adapter_image_embeds",
    )

    def prepare(self, pipe, kw) -> Prepared:
        h = kw["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = kw["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe._guidance_scale = kw["guidance_scale"]
        pipe._joint_attention_kwargs = kw.get("joint_attention_kwargs")
        pipe._current_timestep = None
        pipe._interrupt = False
        pe_in = kw.get("prompt_embeds")
        prompts = prompt_list(kw["prompt"], None if pe_in is None else pe_in.shape[0])
        device = pipe._execution_device
        n = kw["num_images_per_prompt"]
        has_neg = kw.get("negative_prompt") is not None or (
            kw.get("negative_prompt_embeds") is not None and kw.get("negative_pooled_prompt_embeds") is not None
        )
        true_cfg = kw.get("true_cfg_scale", 1.0) > 1 and has_neg
        lora_scale = (kw.get("joint_attention_kwargs") or {}).get("scale")
        enc = dict(
            device=device, num_images_per_prompt=n, max_sequence_length=kw["max_sequence_length"], lora_scale=lora_scale
        )
        pe, pooled, text_ids = pipe.encode_prompt(
            prompt=kw["prompt"],
            prompt_2=kw.get("prompt_2"),
            prompt_embeds=pe_in,
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            **enc,
        )
        uncond = None
        if true_cfg:
            npe, npooled, _ = pipe.encode_prompt(
                prompt=kw.get("negative_prompt"),
                prompt_2=kw.get("negative_prompt_2"),
                prompt_embeds=kw.get("negative_prompt_embeds"),
                pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"),
                **enc,
            )
            if npe.shape != pe.shape:
                raise ValueError(
                    f"negative prompt embeddings {tuple(npe.shape)} do not match prompt embeddings {tuple(pe.shape)}"
                )
            uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled}
        latents, image_ids = pipe.prepare_latents(
            len(prompts) * n,
            pipe.transformer.config.in_channels // 4,
            h,
            w,
            pe.dtype,
            device,
            kw.get("generator"),
            kw.get("latents"),
        )
        steps = kw["num_inference_steps"]
        sigmas = np.linspace(1.0, 1 / steps, steps) if kw.get("sigmas") is None else kw["sigmas"]
        if getattr(pipe.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        c = pipe.scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", 1.15),
        )
        # diffusers annotates `sigmas` as list[float], yet FluxPipeline passes this very array (set_timesteps
        # takes any array-like); the adapter mirrors the pipeline
        timesteps, steps = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)  # type: ignore[arg-type]
        rows = len(prompts) * n
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], kw["guidance_scale"], device=device, dtype=torch.float32).expand(rows)
        lh = 2 * (int(h) // (pipe.vae_scale_factor * 2))
        lw = 2 * (int(w) // (pipe.vae_scale_factor * 2))
        pipe.scheduler.set_begin_index(0)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled, "guidance": guidance}
        if uncond is not None:
            uncond["guidance"] = guidance
        shared = {"txt_ids": text_ids, "img_ids": image_ids}
        if kw.get("joint_attention_kwargs"):
            shared["joint_attention_kwargs"] = kw["joint_attention_kwargs"]
        return Prepared(
            latents=latents,
            timesteps=timesteps,
            num_steps=steps,
            cond=cond,
            uncond=uncond,
            shared=shared,
            guidance_scale=kw.get("true_cfg_scale", 1.0),
            grid=(lh // 2, lw // 2),
            prompts=prompts,
            images=rows,
            text_len=pe.shape[1],
            decode={"height": h, "width": w},
            num_warmup=max(len(timesteps) - steps * pipe.scheduler.order, 0),
        )

    def predict(self, pipe, x, t, rows, shared):
        timestep = t.expand(x.shape[0]).to(x.dtype)
        return pipe.transformer(hidden_states=x, timestep=timestep / 1000, **rows, **shared, return_dict=False)[0]

    def step(self, pipe, prep, noise, t, latents):
        return pipe.scheduler.step(noise, t, latents, return_dict=False)[0]

    def decode(self, pipe, prep, latents, output_type):
        if output_type == "latent":
            return latents, None
        latents = pipe._unpack_latents(latents, prep.decode["height"], prep.decode["width"], pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type), None
