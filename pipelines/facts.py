"""The facts a run carries for its controls, read once from the wrapped diffusers pipeline, so that
no control needs the pipeline object (docs/architecture.md, "The run carries state")."""

from __future__ import annotations

from typing import Any

from attnctrl.inversion import invert_trajectory
from attnctrl.state import RunContext, TextEncoders


def text_encoders(pipe, adapter, max_sequence_length: int | None) -> TextEncoders:
    """The run's tokenizers (as the pipeline names them), CLIP length, T5 length and prompt encoder."""
    return TextEncoders(
        tokenizer=getattr(pipe, "tokenizer", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        tokenizer_3=getattr(pipe, "tokenizer_3", None),
        tokenizer_max_length=int(getattr(pipe, "tokenizer_max_length", 77) or 77),
        max_sequence_length=max_sequence_length,
        encode=None if adapter is None else (lambda texts: adapter.encode_texts(pipe, texts)),
    )


def pixel_size(pipe, family: str, grid: tuple[int, int]) -> tuple[int, int]:
    """Image size (H, W) in pixels for a denoiser token grid."""
    f = int(getattr(pipe, "vae_scale_factor", 8))
    if family == "sd3":
        f *= int(pipe.transformer.config.patch_size)
    elif family == "flux":
        f *= 2
    return grid[0] * f, grid[1] * f


def set_run_facts(
    run: RunContext, pipe, denoiser, adapter=None, max_sequence_length: int | None = None, timesteps: Any = None
) -> None:
    """Put on `run` what its controls may read: text encoders, pixel size, denoiser, timesteps, and
    (with the loop's timesteps) the inversion of a real image to every one of them."""
    run.text = text_encoders(pipe, adapter, max_sequence_length)
    run.pixel_size = pixel_size(pipe, run.family, run.grid) if run.grid != (0, 0) else None
    run.denoiser = denoiser
    if timesteps is not None:
        run.timesteps = [float(t) for t in timesteps]

        def invert(image, prompt: str, guidance_scale: float = 1.0, **kw):
            return invert_trajectory(pipe, image, prompt, timesteps, guidance_scale=guidance_scale, **kw)

        run.invert = invert
