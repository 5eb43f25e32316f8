"""`attach`: attention-level controls on an unmodified diffusers pipeline, as a context.

    with ac.attach(pipe, [ac.AttentionMaps()]) as session:
        image = pipe("a red car").images[0]
    session.results["maps"]

The step state is set by a forward pre-hook on the denoiser from the timestep the pipeline
passes (looked up in the scheduler's timesteps), and the batch layout from the batch size and the
pipeline's own `do_classifier_free_guidance`. Controls with loop-level hooks (extra branches,
guidance, latent updates) need `ControlledPipeline` and are refused here. On exit, also after an
exception, the original processors are back and the hook is removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace

import torch

from attnctrl.control import Control
from attnctrl.layers import LayerInfo, list_layers
from attnctrl.models.loading import family_of
from attnctrl.plan import build_plan, check_controls
from attnctrl.processors.install import installed
from attnctrl.selectors import as_selectors, select
from attnctrl.state import BatchLayout, RunContext, StepState

from .facts import pixel_size, set_run_facts


class AttachSession:
    """What `attach` yields: the run context and, after the pipeline call, the controls' results."""

    def __init__(self, run: RunContext, controls: list[Control]):
        self.run = run
        self.controls = controls

    @property
    def results(self) -> dict:
        return {c.result_key: c.result(self.run) for c in self.controls if c.result_key}

    @property
    def maps(self):
        return self.results.get("maps")


def _grid(family: str, pipe, x: torch.Tensor, kwargs: dict) -> tuple[int, int]:
    if family in ("sd", "sdxl"):
        return int(x.shape[-2]), int(x.shape[-1])
    if family == "sd3":
        p = pipe.transformer.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p
    ids = kwargs["img_ids"]
    return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1


def _step_index(scheduler, t: float) -> int:
    return int((scheduler.timesteps.float() - t).abs().argmin())


@contextmanager
def attach(pipe, controls: Sequence[Control] | Control) -> Iterator[AttachSession]:
    """Attach attention-level `controls` to a diffusers (or Controlled) pipeline for the block."""
    pipe = getattr(pipe, "pipe", pipe)
    family = family_of(pipe)
    controls = check_controls(controls)
    for c in controls:
        loop = list(c.loop_hooks())
        if loop:
            raise ValueError(
                f"{type(c).__name__} needs the attnctrl denoising loop ({', '.join(loop)}); use ac.ControlledPipeline"
            )
    denoiser = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    layers = list_layers(denoiser)
    # every layer a selector can pick at some size (res= is decided per call)
    candidates: dict[str, LayerInfo] = {}
    for c in controls:
        sels = as_selectors(c.layers)
        ignore_res = [replace(s, res=frozenset()) for s in sels]
        for layer, _ in select(layers, ignore_res, None, owner=type(c).__name__):
            candidates[layer.name] = layer
    run = RunContext(family=family, layout=BatchLayout.build(1, False), grid=(0, 0))
    set_run_facts(run, pipe, denoiser)  # no prompts here: controls that read words refuse attach

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        tv = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if family == "flux":
            tv *= 1000.0  # FLUX's pipeline passes timestep / 1000; StepState uses the scheduler's scale
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", False))
        if family == "flux":
            cfg = False  # FLUX's true-CFG pass is a separate call; both passes are read as "cond"
        images = x.shape[0] // 2 if cfg else x.shape[0]
        run.layout = BatchLayout.build(images, cfg)
        run.state = StepState(_step_index(pipe.scheduler, tv), tv, len(pipe.scheduler.timesteps))
        ehs = kwargs.get("encoder_hidden_states")
        run.text_len = None if ehs is None else ehs.shape[1]
        grid = _grid(family, pipe, x, kwargs)
        if grid != run.grid:
            run.grid = grid
            run.pixel_size = pixel_size(pipe, family, grid)
            run.plan = build_plan(controls, layers, grid)
        return None

    with ExitStack() as stack:
        handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
        stack.callback(handle.remove)
        stack.enter_context(installed(denoiser, run, list(candidates.values())))
        for c in controls:
            c.begin(run)
        # results stay readable after the block: `end()` is not called here
        yield AttachSession(run, controls)
