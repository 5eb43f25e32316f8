"""The source image of `MutualSelfAttention`: real-image inversion and start latents (MasaCtrl, Cao et al., ICCV 2023)."""

from __future__ import annotations

from ..images import open_image


def invert(ctrl, run):
    """The source image inverted to every timestep of the run (`run.invert`)."""
    if run.invert is None:
        raise ValueError("source_image needs ControlledPipeline (the inverted latents enter its loop)")
    if run.family not in ("sd", "sdxl"):
        raise NotImplementedError(f"source_image (DDIM inversion) supports SD and SDXL, not {run.family}")
    image = open_image(ctrl.source_image, what="source image")
    prompt = ctrl.source_prompt or run.prompt_of(ctrl.source)
    h, w = run.pixel_size
    return run.invert(image, prompt, guidance_scale=ctrl.inversion_guidance, height=h, width=w)


def start_latents(ctrl, run, latents):
    """Step 0: every row starts from the source's latents (or the inverted ones); the inverted source
    row is pinned to the trajectory (`at_step(i)`: the latents at the run's i-th timestep)."""
    st, index = run.store.get(ctrl), run.state.index
    inverted = None if st is None else st.get("inverted")
    if index == 0 and ctrl.same_noise and latents.shape[0] > 1:
        start = latents[ctrl.source] if inverted is None else inverted.at_step(0)[0]
        latents = start.to(latents.device, latents.dtype).expand_as(latents).clone()
    if inverted is not None and (ctrl.pin_source or index == 0):
        latents = latents.clone()
        latents[ctrl.source] = inverted.at_step(index)[0].to(latents.device, latents.dtype)
    return latents
