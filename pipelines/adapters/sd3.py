"""Stable Diffusion 3 / 3.5 adapter (mirrors `StableDiffusion3Pipeline.__call__`)."""

from __future__ import annotations

from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from .base import Adapter, Prepared, prompt_list


class SD3Adapter(Adapter):
    family = "sd3"
    unsupported = ("ip_adapter_image", "ip_adapter_image_embeds", "skip_guidance_layers")

    def prepare(self, pipe, kw) -> Prepared:
        h = kw["height"] or pipe.default_sample_size * pipe.vae_scale_factor
        w = kw["width"] or pipe.default_sample_size * pipe.vae_scale_factor
        pipe._guidance_scale = kw["guidance_scale"]
        pipe._clip_skip = kw.get("clip_skip")
        pipe._joint_attention_kwargs = kw.get("joint_attention_kwargs")
        pipe._interrupt = False
        cfg = kw["guidance_scale"] > 1
        pe_in = kw.get("prompt_embeds")
        prompts = prompt_list(kw["prompt"], None if pe_in is None else pe_in.shape[0])
        device = pipe._execution_device
        n = kw["num_images_per_prompt"]
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=kw["prompt"],
            prompt_2=kw.get("prompt_2"),
            prompt_3=kw.get("prompt_3"),
            negative_prompt=kw.get("negative_prompt"),
            negative_prompt_2=kw.get("negative_prompt_2"),
            negative_prompt_3=kw.get("negative_prompt_3"),
            do_classifier_free_guidance=cfg,
            prompt_embeds=pe_in,
            negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            pooled_prompt_embeds=kw.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=kw.get("negative_pooled_prompt_embeds"),
            device=device,
            clip_skip=kw.get("clip_skip"),
            num_images_per_prompt=n,
            max_sequence_length=kw["max_sequence_length"],
            lora_scale=(kw.get("joint_attention_kwargs") or {}).get("scale"),
        )
        latents = pipe.prepare_latents(
            len(prompts) * n,
            pipe.transformer.config.in_channels,
            h,
            w,
            pe.dtype,
            device,
            kw.get("generator"),
            kw.get("latents"),
        )
        patch = pipe.transformer.config.patch_size
        grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
        sched_kw, mu = {}, kw.get("mu")
        if pipe.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            c = pipe.scheduler.config
            mu = calculate_shift(
                grid[0] * grid[1],
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        if mu is not None:
            sched_kw["mu"] = mu
        timesteps, steps = retrieve_timesteps(
            pipe.scheduler, kw["num_inference_steps"], device, sigmas=kw.get("sigmas"), **sched_kw
        )
        shared = {}
        if kw.get("joint_attention_kwargs"):
            shared["joint_attention_kwargs"] = kw["joint_attention_kwargs"]
        return Prepared(
            latents=latents,
            timesteps=timesteps,
            num_steps=steps,
            cond={"encoder_hidden_states": pe, "pooled_projections": pooled},
            uncond={"encoder_hidden_states": npe, "pooled_projections": npooled} if cfg else None,
            shared=shared,
            guidance_scale=kw["guidance_scale"],
            grid=grid,
            prompts=prompts,
            images=len(prompts) * n,
            text_len=pe.shape[1],
            num_warmup=max(len(timesteps) - steps * pipe.scheduler.order, 0),
        )

    def predict(self, pipe, x, t, rows, shared):
        return pipe.transformer(hidden_states=x, timestep=t.expand(x.shape[0]), **rows, **shared, return_dict=False)[0]

    def step(self, pipe, prep, noise, t, latents):
        return pipe.scheduler.step(noise, t, latents, return_dict=False)[0]

    def decode(self, pipe, prep, latents, output_type):
        if output_type == "latent":
            return latents, None
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type), None
