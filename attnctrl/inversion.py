"""DDIM inversion for SD 1.x/2.x and SDXL: the latents trajectory z_0 … z_T of an image.

DDIM (Song et al., ICLR 2021, Eq. 12 with σ = 0) run backwards, as in Null-text inversion
(Mokady et al., CVPR 2023, §3) and StyleAligned's ``inversion.py``: from z_s to the noisier z_t
(s = t − T/N, the timestep DDIM steps to from t), with ε evaluated at (z_s, t):

    x̂_0 = (z_s − √(1−ᾱ_s)·ε) / √ᾱ_s,      z_t = √ᾱ_t·x̂_0 + √(1−ᾱ_t)·ε

which is the DDIM sampling step t → s solved for z_t. ᾱ comes from the pipeline's own scheduler
config (ᾱ of s < 0 is the scheduler's ``final_alpha_cumprod``); the text conditioning is the
pipeline's own ``encode_prompt`` (SDXL: with the size-conditioning ids the pipeline uses).

    res = ddim_invert(pipe, image, "a photo of a cat", num_inference_steps=50)
    out = pipe("a photo of a cat", latents=res.zT, guidance_scale=1.0, num_inference_steps=50)  # ≈ image

`invert_trajectory(pipe, image, prompt, timesteps)` inverts to the timesteps of a run with any
variance-preserving scheduler (PNDM, DPM-Solver, ...), indexed by the run's steps: the one
function a control uses to put a real image in a batch row (SharedAttention's ``reference_image``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["InversionResult", "ddim_invert", "encode_image", "invert_latents", "invert_trajectory"]


@dataclass
class InversionResult:
    """latents_trajectory: [z_0, …, z_T] (z_0 the clean latents, z_T the noisiest), one entry after
    z_0 per generation timestep (`invert_trajectory` repeats the latents of a repeated timestep);
    timesteps: the generation timesteps, descending (generation step i runs at ``timesteps[i]`` on
    ``at_step(i)``; ``at_step(len(timesteps))`` is z_0)."""

    latents_trajectory: list[torch.Tensor]
    timesteps: torch.Tensor
    prompt: str

    @property
    def zT(self) -> torch.Tensor:
        """Starting latents for regeneration (pass as ``latents=``)."""
        return self.latents_trajectory[-1]

    def at_step(self, i: int) -> torch.Tensor:
        """The inverted latents at the input of generation step i (z at ``timesteps[i]``)."""
        return self.latents_trajectory[len(self.timesteps) - i]


def _diffusers(pipe):
    """The diffusers pipeline a ControlledPipeline wraps (its ``.pipe``), or `pipe` itself.

    Duck-typed so the core does not import the pipelines layer (the import contract in pyproject)."""
    from diffusers import DiffusionPipeline

    inner = getattr(pipe, "pipe", None)
    return inner if isinstance(inner, DiffusionPipeline) else pipe


def _invertible_family(pipe) -> str:
    from .models.loading import family_of

    family = family_of(pipe)
    if family not in ("sd", "sdxl"):
        raise NotImplementedError(f"DDIM inversion supports SD and SDXL pipelines; got a {family} pipeline")
    return family


def encode_image(pipe, image, height: int | None = None, width: int | None = None, generator=None) -> torch.Tensor:
    """VAE latents of `image` (PIL, array or tensor in [-1, 1]) × scaling factor, at height × width.

    The posterior mean, or a sample from it with `generator`.
    """
    pipe = _diffusers(pipe)
    vae = pipe.vae
    x = pipe.image_processor.preprocess(image, height=height, width=width)
    x = x.to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(x).latent_dist
    z = dist.mean if generator is None else dist.sample(generator)
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(z.device, z.dtype)
        return (z - mean) * cfg.scaling_factor / std
    return z * cfg.scaling_factor


def _conditioning(pipe, family: str, prompt: str, cfg: bool, negative_prompt, size: tuple[int, int]):
    """UNet keyword arguments (cond, uncond or None) as the stock pipeline builds them."""
    device = pipe._execution_device
    if family == "sd":
        pe, npe = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
        return {"encoder_hidden_states": pe}, ({"encoder_hidden_states": npe} if cfg else None)
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=cfg,
        negative_prompt=negative_prompt,
    )
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj).to(device)

    def branch(e, p):
        return {"encoder_hidden_states": e, "added_cond_kwargs": {"text_embeds": p, "time_ids": ids}}

    return branch(pe, pooled), (branch(npe, npooled) if cfg else None)


def _ddim_up(z_s: torch.Tensor, eps: torch.Tensor, a_s: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """z_t = √ᾱ_t·x̂_0 + √(1−ᾱ_t)·ε with x̂_0 = (z_s − √(1−ᾱ_s)·ε)/√ᾱ_s (in float64)."""
    x0 = (z_s.double() - (1 - a_s).sqrt() * eps.double()) / a_s.sqrt()
    return (a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps.double()).to(z_s.dtype)


def _invert_steps(
    pipe,
    family: str,
    latents: torch.Tensor,
    prompt: str,
    steps,
    guidance_scale: float,
    negative_prompt,
    fixed_point_iterations: int,
) -> list[torch.Tensor]:
    """DDIM inversion steps ``[(t, ᾱ_s, ᾱ_t), ...]`` (ascending t) from clean `latents`: z after each step."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("inversion needs a non-empty prompt describing the image")
    cfg = guidance_scale > 1.0
    vae_scale = pipe.vae_scale_factor
    size = (latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale)
    cond, uncond = _conditioning(pipe, family, prompt, cfg, negative_prompt, size)
    unet = pipe.unet
    z = latents.to(device=unet.device, dtype=unet.dtype)
    rows = (
        cond
        if not cfg
        else {
            "encoder_hidden_states": torch.cat([uncond["encoder_hidden_states"], cond["encoder_hidden_states"]]),
            **(
                {
                    "added_cond_kwargs": {
                        k: torch.cat([uncond["added_cond_kwargs"][k], cond["added_cond_kwargs"][k]])
                        for k in cond["added_cond_kwargs"]
                    }
                }
                if "added_cond_kwargs" in cond
                else {}
            ),
        }
    )
    out = []
    for t, a_s, a_t in steps:
        tt = torch.tensor(t, device=z.device)

        def eps_at(x, tt=tt, rows=rows):
            e = unet(torch.cat([x, x]) if cfg else x, tt, **rows, return_dict=False)[0]
            if cfg:
                eu, ec = e.chunk(2)
                e = eu + guidance_scale * (ec - eu)
            return e

        z_next = _ddim_up(z, eps_at(z), a_s, a_t)
        for _ in range(fixed_point_iterations):  # ε at the new point: the exact inverse of the DDIM step
            z_next = _ddim_up(z, eps_at(z_next), a_s, a_t)
        z = z_next
        out.append(z.clone())
    return out


def _final_alpha(sched) -> torch.Tensor:
    final = getattr(sched, "final_alpha_cumprod", None)
    if final is None:
        final = torch.tensor(1.0) if getattr(sched.config, "set_alpha_to_one", False) else sched.alphas_cumprod[0]
    return torch.as_tensor(final)


@torch.no_grad()
def invert_latents(
    pipe,
    latents: torch.Tensor,
    prompt: str,
    timesteps,
    guidance_scale: float = 1.0,
    negative_prompt=None,
    scheduler=None,
    fixed_point_iterations: int = 0,
) -> InversionResult:
    """DDIM-invert clean `latents` (1, C, h, w) along the descending DDIM generation `timesteps`
    (ᾱ from `scheduler`, default the pipeline's; each step goes up from t − T/N to t, T/N the DDIM
    stride, so the timesteps must be DDIM's own for N steps — `invert_trajectory` takes any
    scheduler's). `fixed_point_iterations` > 0 re-evaluates ε at the new z_t that many times
    (fixed-point DDIM inversion, Pan et al. ICCV 2023 "AIDI")."""
    pipe = _diffusers(pipe)
    family = _invertible_family(pipe)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("inversion needs a non-empty prompt describing the image")
    sched = scheduler if scheduler is not None else pipe.scheduler
    timesteps = torch.as_tensor(timesteps).flatten()
    n = len(timesteps)
    if n < 1:
        raise ValueError("inversion needs at least one timestep")
    alphas, final = sched.alphas_cumprod, _final_alpha(sched)
    stride = sched.config.num_train_timesteps // n
    steps = []
    for t in reversed([int(t) for t in timesteps.tolist()]):
        s = t - stride
        steps.append((t, (alphas[s] if s >= 0 else final).to(torch.float64), alphas[t].to(torch.float64)))
    zs = _invert_steps(pipe, family, latents, prompt, steps, guidance_scale, negative_prompt, fixed_point_iterations)
    z0 = latents.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    return InversionResult(latents_trajectory=[z0.clone(), *zs], timesteps=timesteps, prompt=prompt)


@torch.no_grad()
def invert_trajectory(
    pipe,
    image,
    prompt: str,
    timesteps,
    guidance_scale: float = 1.0,
    *,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    negative_prompt: str | None = None,
    fixed_point_iterations: int = 0,
) -> InversionResult:
    """DDIM inversion of `image` (or clean VAE `latents`) to every timestep of a run, whatever its scheduler.

    `timesteps` are the run's own, as its scheduler gives them (``pipe.scheduler.timesteps`` after
    ``set_timesteps``): DDIM, PNDM (whose list repeats a timestep: ``[901, 801, 801, 701, …]``),
    DPM-Solver, UniPC, ... — any scheduler on variance-preserving latents with integer timesteps.
    The inversion runs DDIM (Eq. 12, σ = 0, solved for z_t with ε at z_s, as `invert_latents`) up
    the run's distinct timesteps in ascending order, each step from the previous one (the first
    from z_0, with DDIM's ``final_alpha_cumprod`` as ᾱ_s), with ᾱ of
    ``DDIMScheduler.from_config(pipe.scheduler.config)``. On DDIM's own timesteps that is exactly
    `ddim_invert`. The result is indexed by the run's steps: ``res.at_step(i)`` is z at
    ``timesteps[i]`` (a repeated timestep gets the same latents), ``res.at_step(len(timesteps))``
    is z_0, and ``res.timesteps`` are the run's timesteps.

    Args mirror `ddim_invert`: `guidance_scale` is the CFG scale during inversion (1: conditional
    only; StyleAligned's transfer notebook inverts with 2), `seed` samples the VAE posterior,
    `latents` skips the VAE, `fixed_point_iterations` re-evaluates ε at each new z_t.
    """
    from diffusers import DDIMScheduler

    pipe = _diffusers(pipe)
    family = _invertible_family(pipe)
    ts = torch.as_tensor(timesteps).flatten()
    if len(ts) < 1:
        raise ValueError("inversion needs at least one timestep")
    sigma = float(getattr(pipe.scheduler, "init_noise_sigma", 1.0))
    if abs(sigma - 1.0) > 1e-6:
        raise ValueError(
            f"invert_trajectory needs a variance-preserving scheduler (DDIM, PNDM, DPM-Solver, UniPC, ...); "
            f"{type(pipe.scheduler).__name__} works in sigma space. Use DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    values = ts.tolist()
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    n_train = ddim.config.num_train_timesteps
    if any(float(t) != int(t) or not 0 <= int(t) < n_train for t in values):
        raise ValueError(
            f"invert_trajectory needs integer timesteps in [0, {n_train}) (a variance-preserving scheduler's); "
            f"got {values[:6]}"
        )
    values = [int(t) for t in values]
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"invert_trajectory needs the run's timesteps in descending order; got {values}")
    if latents is None:
        if image is None:
            raise ValueError("give an image (or latents=) to invert")
        gen = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        latents = encode_image(pipe, image, height, width, generator=gen)
    alphas, final = ddim.alphas_cumprod, _final_alpha(ddim)
    up = sorted(set(values))
    steps = [
        (t, (alphas[s] if s >= 0 else final).to(torch.float64), alphas[t].to(torch.float64))
        for s, t in zip([-1, *up[:-1]], up)
    ]
    zs = _invert_steps(pipe, family, latents, prompt, steps, guidance_scale, negative_prompt, fixed_point_iterations)
    at = dict(zip(up, zs))
    z0 = latents.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    return InversionResult(
        latents_trajectory=[z0.clone(), *(at[t] for t in reversed(values))], timesteps=ts, prompt=prompt
    )


@torch.no_grad()
def ddim_invert(
    pipe,
    image,
    prompt: str,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int | None = None,
    *,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    fixed_point_iterations: int = 0,
) -> InversionResult:
    """DDIM inversion of `image` (or of clean VAE `latents`, skipping the VAE) under `prompt`.

    Args:
        pipe: a ControlledPipeline or a diffusers SD / SDXL pipeline (its scheduler config gives ᾱ;
            the timesteps are those of ``DDIMScheduler.from_config(pipe.scheduler.config)``).
        image: PIL image, array or tensor; resized to height × width (default: the image's size).
        prompt: text describing the image (its conditioning is the pipeline's own encoding).
        num_inference_steps: N; the trajectory has N + 1 latents.
        guidance_scale: CFG scale during inversion (1: conditional prediction only).
        seed: sample the VAE posterior with this seed (default: its mean).
        latents: clean latents to invert instead of an image.
        fixed_point_iterations: re-evaluate ε at each new z_t this many times (0: plain DDIM
            inversion as in StyleAligned; a few make the round trip exact where they converge).

    The round trip (regenerating from ``zT`` with DDIM, the same prompt, CFG = guidance_scale)
    is exact only where ε(z_s, t) ≈ ε(z_t, t); DDIM's ``clip_sample`` must be off.
    """
    from diffusers import DDIMScheduler

    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    pipe = _diffusers(pipe)
    _invertible_family(pipe)
    if latents is None:
        if image is None:
            raise ValueError("give an image (or latents=) to invert")
        gen = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        latents = encode_image(pipe, image, height, width, generator=gen)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    return invert_latents(
        pipe,
        latents,
        prompt,
        ddim.timesteps,
        guidance_scale,
        negative_prompt,
        scheduler=ddim,
        fixed_point_iterations=fixed_point_iterations,
    )
