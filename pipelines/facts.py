"""The facts a run carries for its controls, read once from the wrapped diffusers pipeline, so that
no control needs the pipeline object (docs/architecture.md, "The run carries state")."""

from __future__ import annotations

from typing import Any

from attnctrl.inversion import invert_trajectory
from attnctrl.run_args import ModelFacts
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


def model_facts(pipe, family: str, default_size: tuple[int, int]) -> ModelFacts:
    """What `attnctrl.run_args` checks a call against, read from the wrapped diffusers pipeline."""
    vsf = int(getattr(pipe, "vae_scale_factor", 8))
    multiple, reason, max_size = vsf, f"the VAE's scale factor {vsf}", None
    if family == "sd3":
        config = pipe.transformer.config
        patch = int(config.patch_size)
        multiple, reason = vsf * patch, f"VAE scale factor {vsf} x patch size {patch}"
        if config.get("pos_embed_max_size"):
            max_size = int(config.pos_embed_max_size) * multiple
    elif family == "flux":
        multiple, reason = vsf * 2, f"VAE scale factor {vsf} x FLUX's 2x2 latent packing"
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
    depths = [
        int(e.config.num_hidden_layers)
        for e in encoders
        if e is not None and type(e).__name__.startswith("CLIPText") and hasattr(e.config, "num_hidden_layers")
    ]
    vocabulary = getattr(getattr(pipe, "tokenizer", None), "closed_vocabulary", None)
    scheduler = pipe.scheduler
    return ModelFacts(
        family=family,
        scheduler=type(scheduler).__name__,
        num_train_timesteps=int(scheduler.config.get("num_train_timesteps", 1000) or 1000),
        size_multiple=multiple,
        size_reason=reason,
        default_size=default_size,
        max_size=max_size,
        clip_layers=min(depths) if depths else None,
        vocabulary=frozenset(vocabulary) if vocabulary is not None else None,
    )


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
