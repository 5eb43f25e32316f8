"""The panorama loop: every step denoises views of the latent canvas and merges their predictions.

for each step i, timestep t:
    for each batch of views:                              # all of them at once by default (MAD: always)
        x      = views of the canvas (rows: branch, image, view)
        preds  = split(denoiser(x))                       # run.layout: the views are the batch's images
        guided = combine(guide(preds)), rescaled           # as `denoise_loop`, per view
        ε     += Σ_i w_i · guided_i  into the canvas       # MultiDiffusion's merge (Eq. 5), w_i = 1/#views
    latents = scheduler.step(ε, t, latents)                # one step of the whole canvas

Merging the predictions and stepping once equals MultiDiffusion's average of the views' stepped
latents for samplers affine in (x, ε) with per-step scalars (DDIM, Euler, DPM-Solver), and keeps
one scheduler state for the canvas. `denoise_loop` is untouched: runs without `Panorama` use it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attnctrl.control import Control
from attnctrl.controls.panorama import Panorama
from attnctrl.layers import list_layers
from attnctrl.panorama import make_views
from attnctrl.state import BatchLayout, RunContext, StepState

from .adapters.base import Adapter, Prepared
from .loop import branch_inputs, guide, rescale

__all__ = ["split_panorama", "panorama_setup", "panorama_loop", "panorama_results"]

#: controls that compose with a panorama, and the methods they compose with
COMPOSES = {
    "PAG": ("mad", "multidiffusion"),
    "HeadPerturbation": ("mad", "multidiffusion"),
    "AttentionMaps": ("mad", "multidiffusion"),  # all views in one call; merged into the canvas after
}
COMPOSES_MD = {"SharedAttention": ("multidiffusion",)}


def split_panorama(controls: Sequence[Control], family: str) -> tuple[list[Control], Panorama | None]:
    """The controls with the `Panorama` first (its merge acts before the others' edits on a layer),
    and the `Panorama` or None. Refuses what does not compose, before anything runs."""
    panos = [c for c in controls if isinstance(c, Panorama)]
    if not panos:
        return list(controls), None
    if len(panos) > 1:
        raise ValueError("give one ac.Panorama per run")
    pano = panos[0]
    if family not in ("sd", "sdxl"):
        raise NotImplementedError(
            f"ac.Panorama runs on SD 1.x/2.x and SDXL UNets; not on {family} (MAD's operator is defined on UNet views)"
        )
    allowed = {**COMPOSES, **COMPOSES_MD}
    for c in controls:
        if c is pano:
            continue
        kind = type(c).__name__
        if pano.method not in allowed.get(kind, ()):
            why = (
                f"with method={pano.method!r}; use method='multidiffusion'"
                if kind in allowed
                else "(it reads or edits the image as one grid or changes the latents between steps)"
            )
            raise ValueError(f"ac.Panorama does not compose with {kind} {why}; composes with: {', '.join(allowed)}")
    kinds = {type(c).__name__ for c in controls}
    if "AttentionMaps" in kinds and ("SharedAttention" in kinds or pano.view_batch is not None):
        raise ValueError("panorama maps need all views in one denoiser call: drop view_batch / SharedAttention")
    return [pano] + [c for c in controls if c is not pano], pano


def _native_size(denoiser) -> int:
    size = denoiser.config.sample_size
    return size if isinstance(size, int) else min(size)


def panorama_setup(pano: Panorama, run: RunContext, prep: Prepared, denoiser) -> None:
    """The run's views (in `run.store[pano]`) and the view grid the layers see (`run.grid`)."""
    h, w = prep.latents.shape[-2:]
    view = pano.view_size(_native_size(denoiser))
    views = make_views(h, w, view, pano.stride_for(min(view, h, w)), pano.circular)
    if pano.method == "mad":  # the merge maps tokens at every attention layer's factor: check them all now
        for factor in sorted({layer.factor for layer in list_layers(denoiser)}):
            views.index(factor, prep.latents.device)
    run.store[pano] = {"views": views}
    run.grid = (views.view_h, views.view_w)


def _expand(rows, branches: int, images: int, views: int):
    """Per-row inputs (branch, image) → (branch, image, view) rows, nested dicts included."""
    if isinstance(rows, dict):
        return {k: _expand(v, branches, images, views) for k, v in rows.items()}
    if not isinstance(rows, torch.Tensor):
        return rows
    x = rows.reshape(branches, images, *rows.shape[1:]).repeat_interleave(views, dim=1)
    return x.reshape(branches * images * views, *rows.shape[1:])


def panorama_loop(
    pano: Panorama,
    pipe,
    adapter: Adapter,
    prep: Prepared,
    run: RunContext,
    controls: Sequence[Control],
    callback_on_step_end: Callable | None = None,
    callback_tensor_inputs: Sequence[str] = ("latents",),
) -> torch.Tensor:
    """Run the panorama loop (module doc) and return the final canvas latents."""
    views = run.store[pano]["views"]
    extra = [b for c in controls for b in c.branches(run)]
    base = BatchLayout.build(prep.images, prep.cfg, extra)
    rows = branch_inputs(prep, run, base, controls)
    n_views = len(views)
    per_call = n_views if pano.method == "mad" else (pano.view_batch or n_views)
    if any(type(c).__name__ in COMPOSES_MD for c in controls):
        per_call = 1  # view i of every panorama in one call: SharedAttention's reference is that view
    batches = [range(s, min(s + per_call, n_views)) for s in range(0, n_views, per_call)]
    expanded = {len(r): _expand(rows, len(base.branches), prep.images, len(r)) for r in batches}
    combiners = [c for c in controls if c.implements("combine")]
    watchers = [c for c in controls if c.implements("after_step")]
    timesteps = prep.timesteps
    t_values = timesteps.tolist()
    latents = prep.latents
    b, ch = latents.shape[:2]
    with pipe.progress_bar(total=prep.num_steps) as bar:
        for i, t in enumerate(timesteps):
            if getattr(pipe, "_interrupt", False):
                continue
            run.state = StepState(i, t_values[i], len(t_values))
            merged = latents.new_zeros(b, views.tokens(), ch)
            for which in batches:
                layout = BatchLayout(base.branches, prep.images * len(which))
                run.layout = layout
                x = views.crop(latents, which)
                x = torch.cat([x] * len(base.branches)) if len(base.branches) > 1 else x
                x = adapter.model_input(pipe, x, t)
                noise = adapter.predict(pipe, x, t, expanded[len(which)], prep.shared)
                preds = layout.split(noise)
                guided = guide(prep, preds)
                for c in combiners:
                    guided = c.combine(run, preds, guided)
                guided = rescale(prep, preds, guided)
                tokens = guided.reshape(b, len(which), ch, -1).transpose(2, 3)  # (B, V', L, C)
                merged = merged + views.merge(tokens, 1, which)
            noise_canvas = merged.transpose(1, 2).reshape(latents.shape)
            latents = adapter.step(pipe, prep, noise_canvas, t, latents)
            for c in watchers:
                c.after_step(run, latents)
            if callback_on_step_end is not None:
                missing = [k for k in callback_tensor_inputs if k != "latents"]
                if missing:
                    raise ValueError(f"callback_on_step_end_tensor_inputs {missing} are not available; use ['latents']")
                out = callback_on_step_end(pipe, i, t, {"latents": latents}) or {}
                latents = out.pop("latents", latents)
            if i == len(timesteps) - 1 or ((i + 1) > prep.num_warmup and (i + 1) % pipe.scheduler.order == 0):
                bar.update()
    run.layout = base
    return latents


def panorama_results(pano: Panorama, run: RunContext, results: dict) -> dict:
    """Controls' results over the canvas: `AttentionMaps`' per-view maps (images · views rows, from
    each view's own probabilities; for MAD, of the views' unmerged queries) merged with the views'
    weights into maps of the whole panorama, one per image, at each layer's canvas resolution."""
    from attnctrl.maps import AttentionMapResult

    views = run.store[pano]["views"]
    out = dict(results)
    for key, value in results.items():
        if not isinstance(value, AttentionMapResult):
            continue
        by_res = {}
        for (h, w), m in value.by_res.items():  # (images · V, T, h, w)
            f = views.view_h // h
            tokens = m.reshape(-1, len(views), m.shape[1], h * w).transpose(2, 3)  # (images, V, L, T)
            canvas = views.merge(tokens, f).transpose(1, 2)  # (images, T, N)
            by_res[(views.height // f, views.width // f)] = canvas.reshape(*canvas.shape[:2], views.height // f, -1)
        out[key] = AttentionMapResult(by_res, prompts=list(run.prompts), text=run.text, family=run.family)
    return out
