"""The one generic denoising loop: branches, guidance, latent-update hooks, callbacks, progress.

for each step i, timestep t:
    run.state = StepState(i, t, T)                      # explicit, never counted
    latents = c.before_step(run, latents, denoise)      # e.g. Attend-and-Excite updates
    preds   = split(denoiser(cat(latents per branch)))  # {"uncond", "cond", extra branches}
    guided  = ε_u + w(ε_c − ε_u)   (or ε_c without CFG) # exactly the stock expression
    guided  = c.combine(run, preds, guided)             # e.g. PAG: + s(ε_c − ε_ptb)
    guided  = rescale(guided, ε_c)                      # guidance_rescale, last, as diffusers' PAG pipelines
    latents = scheduler.step(guided, t, latents)
    latents = adapter.after_step(pipe, prep, i, latents)  # the pipeline kind's own (inpainting's blend)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from attnctrl.control import Control
from attnctrl.state import BatchLayout, RunContext, StepState

from .adapters.base import Adapter, Prepared, cat_rows


def branch_inputs(prep: Prepared, run: RunContext, layout: BatchLayout, controls: Sequence[Control]) -> dict:
    """Per-row model inputs for the whole batch, branch by branch in layout order."""
    sources = {"cond": prep.cond, "uncond": prep.uncond}
    owner = {b: c for c in controls for b in c.branches(run)}
    parts = []
    for branch in layout.branches:
        src = branch if branch in sources else owner[branch].branch_source(branch)
        if sources.get(src) is None:
            raise ValueError(f"branch {branch!r} needs the {src!r} conditioning, which this run does not have")
        parts.append(sources[src])
    return cat_rows(parts)


def guide(prep: Prepared, preds: dict) -> torch.Tensor:
    """Classifier-free guidance exactly as the stock pipelines write it."""
    if not prep.cfg:
        return preds["cond"]
    u, c = preds["uncond"], preds["cond"]
    return u + prep.guidance_scale * (c - u)


def rescale(prep: Prepared, preds: dict, guided: torch.Tensor) -> torch.Tensor:
    """`guidance_rescale` (Lin et al. 2024, §3.4) toward ε_c's std, after every guidance term has been added:
    diffusers' PAG pipelines add ``s(ε_c − ε_ptb)`` first and rescale the sum."""
    if not prep.cfg or prep.guidance_rescale <= 0.0:
        return guided
    return rescale_noise_cfg(guided, preds["cond"], guidance_rescale=prep.guidance_rescale)


def denoise_loop(
    pipe,
    adapter: Adapter,
    prep: Prepared,
    run: RunContext,
    controls: Sequence[Control],
    callback_on_step_end: Callable | None = None,
    callback_tensor_inputs: Sequence[str] = ("latents",),
) -> torch.Tensor:
    """Run the denoising loop and return the final latents (in the pipeline's own layout)."""
    extra = [b for c in controls for b in c.branches(run)]
    layout = BatchLayout.build(prep.images, prep.cfg, extra)
    cond_layout = BatchLayout.build(prep.images, False)
    rows = branch_inputs(prep, run, layout, controls)
    updaters = [c for c in controls if c.implements("before_step")]
    combiners = [c for c in controls if c.implements("combine")]
    watchers = [c for c in controls if c.implements("after_step")]
    n = len(layout.branches)
    timesteps = prep.timesteps
    t_values = timesteps.tolist()  # one host sync before the loop, none inside it
    latents = prep.latents

    def denoise_cond(x: torch.Tensor) -> torch.Tensor:
        """Conditional prediction for latents `x` at the current step (used by latent updates)."""
        run.layout = cond_layout
        try:
            assert run.state is not None  # the loop sets it before any latent update
            t = timesteps[run.state.index]
            shared = {**prep.shared, **adapter.step_inputs(prep, run.state.index)}
            return adapter.predict(pipe, adapter.model_input(pipe, x, t), t, prep.cond, shared)
        finally:
            run.layout = layout

    run.layout = layout
    with pipe.progress_bar(total=prep.num_steps) as bar:
        for i, t in enumerate(timesteps):
            if getattr(pipe, "_interrupt", False):
                continue
            run.state = StepState(i, t_values[i], len(t_values))  # as `attach` and the reference pipelines count
            for c in updaters:
                latents = c.before_step(run, latents, denoise_cond)
            x = torch.cat([latents] * n) if n > 1 else latents
            x = adapter.model_input(pipe, x, t)
            noise = adapter.predict(pipe, x, t, rows, {**prep.shared, **adapter.step_inputs(prep, i)})
            preds = layout.split(noise)
            guided = guide(prep, preds)
            for c in combiners:
                guided = c.combine(run, preds, guided)
            guided = rescale(prep, preds, guided)
            latents = adapter.step(pipe, prep, guided, t, latents)
            latents = adapter.after_step(pipe, prep, i, latents)
            for c in watchers:
                c.after_step(run, latents)
            if callback_on_step_end is not None:
                available = {"latents": latents}
                missing = [k for k in callback_tensor_inputs if k not in available]
                if missing:
                    raise ValueError(f"callback_on_step_end_tensor_inputs {missing} are not available; use ['latents']")
                out = callback_on_step_end(pipe, i, t, {k: available[k] for k in callback_tensor_inputs}) or {}
                latents = out.pop("latents", latents)
            if i == len(timesteps) - 1 or ((i + 1) > prep.num_warmup and (i + 1) % pipe.scheduler.order == 0):
                bar.update()
    return latents
