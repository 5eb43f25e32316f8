"""`ControlledPipeline`: a diffusers pipeline plus attention controls, as a drop-in `__call__`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnctrl.control import Control
from attnctrl.layers import LayerInfo, list_layers
from attnctrl.models.loading import family_of
from attnctrl.plan import build_plan, check_controls
from attnctrl.processors.install import installed
from attnctrl.run_args import ModelFacts, VocabularyWarning, check_run, check_seed
from attnctrl.state import BatchLayout, RunContext

from .adapters import PIPELINE_ADAPTERS, adapter_for, class_for
from .adapters.base import call_defaults
from .facts import set_run_facts
from .loop import denoise_loop
from .panorama import panorama_loop, panorama_results, panorama_setup, split_panorama

TEXT_TO_IMAGE = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


@dataclass
class ControlledOutput:
    """Result of a controlled run.

    images:  as the stock pipeline returns them for `output_type` (PIL list by default).
    latents: the final latents in the pipeline's own layout (packed for FLUX), before decoding.
    maps:    the `AttentionMaps` result when that control ran, else None.
    results: every control's result by its `result_key`.
    """

    images: Any
    latents: torch.Tensor
    maps: Any = None
    results: dict = field(default_factory=dict)
    nsfw_content_detected: Any = None


class ControlledPipeline:
    """Wraps a diffusers SD / SDXL / SD3 / FLUX pipeline; `__call__` adds `controls=` and `seed=`.

    Every other keyword argument is the wrapped pipeline's own, with its defaults; with no
    controls the result equals the stock pipeline's for the same generator.
    """

    pipe: Any
    defaults: dict

    def __init__(self, pipe, defaults: dict | None = None):
        if isinstance(pipe, ControlledPipeline):
            defaults = {**pipe.defaults, **(defaults or {})}
            pipe = pipe.pipe
        self.pipe = pipe
        self.family = family_of(pipe)
        adapter = adapter_for(pipe)
        if adapter is None or adapter.family != self.family:
            expected = TEXT_TO_IMAGE[self.family]
            runs = ", ".join(k for k, a in PIPELINE_ADAPTERS.items() if a.family == self.family)
            raise TypeError(
                f"ControlledPipeline runs {runs}; got {type(pipe).__name__}. "
                f"Convert it with e.g. diffusers.{expected}.from_pipe(pipe), or use ac.attach(pipe, controls) "
                "for attention-level controls on this pipeline as it is"
            )
        self.adapter = adapter()
        #: call defaults that override the wrapped pipeline's own (e.g. a tiny model's short T5 length)
        self.defaults = dict(defaults or {})
        self._layers: tuple | None = None

    # ---- model facts -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet if self.family in ("sd", "sdxl") else self.pipe.transformer

    def layers(self) -> list[LayerInfo]:
        """All attention layers of the denoiser (see `attnctrl.layers.LayerInfo`), listed once per denoiser."""
        denoiser = self.denoiser
        if self._layers is None or self._layers[0] is not denoiser:
            self._layers = (denoiser, list_layers(denoiser))
        return list(self._layers[1])

    def default_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Image-token grid of the denoiser input for an image of height × width (default size if None)."""
        pipe = self.pipe
        if self.family in ("sd", "sdxl"):
            from .adapters.sd import default_size

            dh, dw = default_size(pipe)
            return (height or dh) // pipe.vae_scale_factor, (width or dw) // pipe.vae_scale_factor
        d = pipe.default_sample_size * pipe.vae_scale_factor
        if self.family == "sd3":
            f = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        else:
            f = pipe.vae_scale_factor * 2
        return (height or d) // f, (width or d) // f

    def model_facts(self) -> ModelFacts:
        """What a call's arguments are checked against (`attnctrl.run_args`): scheduler, valid sizes, ..."""
        from .facts import model_facts, pixel_size

        return model_facts(self.pipe, self.family, pixel_size(self.pipe, self.family, self.default_grid()))

    def check_call(self, prompt=None, *, seed: int | None = None, **kwargs) -> list[str]:
        """Check a call's arguments as `__call__` does, without running: raises the same errors,
        returns the warnings the call would give (e.g. words outside a closed vocabulary)."""
        return self._arguments(prompt, seed, kwargs)[1]

    def call_defaults(self) -> dict:
        """The keyword defaults a call uses: the wrapped pipeline's own, with this wrapper's on top."""
        return {**call_defaults(self.pipe), **self.defaults}

    def __getattr__(self, name: str):
        # components and helpers of the wrapped pipeline (tokenizer, scheduler, vae, to(), ...)
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def as_kind(self, kind: str) -> ControlledPipeline:
        """The same components as another pipeline kind ("text2image", "img2img", "inpaint"), via
        diffusers' `from_pipe` (no weights copied); this wrapper's call defaults carry over."""
        if kind == self.adapter.kind:
            return self
        name = class_for(self.family, kind)
        if name is None:
            raise NotImplementedError(f"attnctrl runs no {kind} pipeline for {self.family} models yet")
        import diffusers

        return ControlledPipeline(getattr(diffusers, name).from_pipe(self.pipe), defaults=self.defaults)

    def to(self, *args, **kwargs) -> ControlledPipeline:
        self.pipe.to(*args, **kwargs)
        return self

    # ---- the call ----------------------------------------------------------------------------
    def _arguments(self, prompt, seed, kwargs) -> tuple[dict, list[str]]:
        defaults = call_defaults(self.pipe)
        unknown = [k for k in kwargs if k not in defaults]
        if unknown:
            raise TypeError(
                f"{type(self.pipe).__name__} has no argument(s) {unknown}; valid: {', '.join(sorted(defaults))}"
            )
        missing = [k for k in self.adapter.required if kwargs.get(k) is None]
        if missing:
            raise ValueError(f"{type(self.pipe).__name__} needs {', '.join(missing)}=")
        used = [k for k in self.adapter.unsupported if kwargs.get(k) is not None]
        if used:
            raise NotImplementedError(f"attnctrl does not support {used} for {self.family} pipelines yet")
        kw = {**defaults, **self.defaults, **kwargs, "prompt": prompt}
        if seed is not None:
            if kwargs.get("generator") is not None:
                raise ValueError("pass either seed= or generator=, not both")
            check_seed(seed)
            kw["generator"] = torch.Generator("cpu").manual_seed(seed)
        notes = check_run(kw, self.model_facts())  # every argument, before any work
        return kw, notes

    def __call__(
        self, prompt=None, *, controls: Sequence[Control] | Control | None = None, seed: int | None = None, **kwargs
    ):
        chosen, pano = split_panorama(check_controls(controls), self.family)
        if pano is not None and self.adapter.kind != "text2image":
            raise NotImplementedError(f"ac.Panorama runs text-to-image pipelines, not {type(self.pipe).__name__}")
        kw, notes = self._arguments(prompt, seed, kwargs)
        output_type = kw.pop("output_type") or "pil"
        return_dict = kw.pop("return_dict")
        callback = kw.pop("callback_on_step_end")
        callback_inputs = kw.pop("callback_on_step_end_tensor_inputs") or ["latents"]

        pipe = self.pipe
        layers = self.layers()
        grad_needed = any(c.implements("before_step") for c in chosen)
        with torch.no_grad() if grad_needed else torch.inference_mode():
            prep = self.adapter.prepare(pipe, kw)
            run = RunContext(
                family=self.family,
                layout=BatchLayout.build(prep.images, prep.cfg),
                grid=prep.grid,
                text_len=prep.text_len,
                prompts=prep.prompts,
            )
            if pano is not None:
                panorama_setup(pano, run, prep, self.denoiser)  # the layers see views: run.grid is a view's
            run.plan = build_plan(chosen, layers, run.grid)
            for note in notes:  # once the run is certain to go ahead
                warnings.warn(note, VocabularyWarning, stacklevel=2)
            t5_length = kw.get("max_sequence_length") if self.family in ("sd3", "flux") else None
            set_run_facts(run, pipe, self.denoiser, self.adapter, t5_length, prep.timesteps)
            planned = [layer for layer in layers if layer.name in run.plan]
            started = []
            try:
                for c in chosen:
                    c.begin(run)
                    started.append(c)
                with installed(self.denoiser, run, planned):
                    if pano is None:
                        latents = denoise_loop(pipe, self.adapter, prep, run, chosen, callback, callback_inputs)
                    else:
                        latents = panorama_loop(pano, pipe, self.adapter, prep, run, chosen, callback, callback_inputs)
                images, nsfw = self.adapter.decode(pipe, prep, latents, output_type)
                results = {c.result_key: c.result(run) for c in chosen if c.result_key}
                if pano is not None:
                    results = panorama_results(pano, run, results)  # maps of the whole canvas
            finally:
                for c in started:
                    c.end(run)
                pipe.maybe_free_model_hooks()
        if not return_dict:
            return (images, nsfw)
        return ControlledOutput(
            images=images, latents=latents, maps=results.get("maps"), results=results, nsfw_content_detected=nsfw
        )
