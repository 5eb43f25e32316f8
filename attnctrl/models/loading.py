"""Load a diffusers pipeline from an embedded tiny name, a local folder, a hub id or an object,
and tell which model family (SD 1.x/2.x, SDXL, SD3, FLUX) a pipeline belongs to."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .tiny import TINY_DEFAULTS, TINY_MODELS, build_tiny

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_DEFAULTS",
    "EMBEDDED_MODELS",
    "FAMILIES",
    "ModelLoadError",
    "UnsupportedModelError",
    "load_pipeline",
    "family_of",
    "model_key",
]

#: Embedded offline models: the tiny random-weight ones and the trained Shapes model.
EMBEDDED_MODELS: dict[str, str] = {
    **TINY_MODELS,
    "shapes": "trained SD-style model of the Shapes world (coloured circles, squares, triangles; 64 px)",
}

#: Call defaults for the Shapes model (`attnctrl.shapes` is imported only when it is loaded).
SHAPES_DEFAULTS: dict[str, object] = {"height": 64, "width": 64, "num_inference_steps": 25, "guidance_scale": 5.0}

#: Recommended call kwargs of each embedded model (``ac.load`` applies them).
EMBEDDED_DEFAULTS: dict[str, dict[str, object]] = {
    **TINY_DEFAULTS,
    "shapes": SHAPES_DEFAULTS,
}

#: Model used when none is given: embedded, so it works offline.
DEFAULT_MODEL = "shapes"

#: Family names returned by :func:`family_of`.
FAMILIES = ("sd", "sdxl", "sd3", "flux")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class ModelLoadError(ValueError):
    """A model could not be found or loaded."""


class UnsupportedModelError(ValueError):
    """The pipeline is not of a supported family (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX)."""


def model_key(model: str | None) -> str:
    """The one spelling of a model text: stripped, the default when empty, embedded names in lower
    case (they are case-insensitive); hub ids and paths as given. Used to load, cache and record."""
    text = (model or "").strip() or DEFAULT_MODEL
    return text.lower() if text.lower() in EMBEDDED_MODELS else text


def _embedded_list() -> str:
    return ", ".join(EMBEDDED_MODELS)


def _place(pipe, torch_dtype: torch.dtype | None, device: str | torch.device | None):
    if torch_dtype is not None or device is not None:
        pipe = pipe.to(device=device, dtype=torch_dtype)
    return pipe


def load_pipeline(
    model: Any = None,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
):
    """Return a diffusers ``DiffusionPipeline`` for ``model``.

    ``model`` may be:

    * ``None``: :data:`DEFAULT_MODEL`;
    * an embedded model name from :data:`EMBEDDED_MODELS` (case-insensitive; takes precedence over a
      folder of the same name, write ``./tiny-sd`` for that): a tiny model from
      :data:`~attnctrl.models.tiny.TINY_MODELS`, built fresh on every call, or ``"shapes"``, the
      trained model shipped in ``attnctrl.assets/shapes``, loaded on every call;
    * a ``DiffusionPipeline``: returned as is (the same object);
    * a local diffusers folder or a hub id ``org/name``: ``DiffusionPipeline.from_pretrained(model,
      torch_dtype=torch_dtype, **kwargs)``.

    ``torch_dtype`` and ``device``, when given, are applied with ``pipe.to``; ``kwargs`` go to
    ``from_pretrained`` and are refused for the other kinds. Raises :class:`ModelLoadError` (a
    ``ValueError``) naming the embedded models when ``model`` is unknown or fails to load, e.g. a hub
    id without network access.
    """
    from diffusers import DiffusionPipeline

    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, DiffusionPipeline):
        _refuse_kwargs(kwargs, "an existing pipeline")
        return _place(model, torch_dtype, device)
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise TypeError(
            f"model must be a name, a path, a hub id or a diffusers DiffusionPipeline, not {type(model).__name__}"
        )
    key = model_key(model) if model.strip() else model
    if key == "shapes":
        from attnctrl.shapes.model import load_shapes_pipeline

        _refuse_kwargs(kwargs, "the embedded model 'shapes'")
        return _place(load_shapes_pipeline(), torch_dtype, device)
    if key in TINY_MODELS:
        _refuse_kwargs(kwargs, f"the embedded model {key!r}")
        return _place(build_tiny(key), torch_dtype, device)

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{model!r} is a file, not a diffusers pipeline folder; load single-file checkpoints with "
                "diffusers' `from_single_file` and pass the pipeline object instead"
            )
        source, what = str(path), f"local folder {str(path)!r}"
    elif _HUB_ID.match(model):
        source, what = model, f"hub id {model!r}"
    elif model.startswith((".", "~", "/", "\\")) or os.sep in model or model.count("/") > 1:
        raise ModelLoadError(f"no such folder: {model!r}. Embedded offline models: {_embedded_list()}")
    else:
        raise ModelLoadError(
            f"unknown model {model!r}: not an embedded model, an existing folder or a hub id 'org/name'. "
            f"Embedded offline models: {_embedded_list()}"
        )
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as err:  # network, cache, missing files, bad config: all reported the same way
        raise ModelLoadError(
            f"could not load the {what}: {type(err).__name__}: {err}\nEmbedded offline models: {_embedded_list()}"
        ) from err
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _refuse_kwargs(kwargs: dict[str, Any], what: str) -> None:
    if kwargs:
        raise TypeError(
            f"keyword arguments {sorted(kwargs)} only apply when loading from a folder or hub id, not for {what}"
        )


def family_of(pipe) -> str:
    """Model family of a diffusers pipeline: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``.

    Decided from the denoiser and text encoders, so task variants (img2img, inpainting, PAG, ...)
    of a family map to it. SD 2.x counts as ``"sd"`` and SD3.5 as ``"sd3"``. Raises
    :class:`UnsupportedModelError` for any other pipeline.
    """
    # diffusers.models: mypy reads diffusers' top-level model names as its dummy classes
    from diffusers.models import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        raise UnsupportedModelError(f"expected a diffusers pipeline, got {type(pipe).__name__}")
    transformer, unet = components.get("transformer"), components.get("unet")
    if isinstance(transformer, FluxTransformer2DModel):
        return "flux"
    if isinstance(transformer, SD3Transformer2DModel):
        return "sd3"
    if isinstance(unet, UNet2DConditionModel):
        config = unet.config
        if config.get("addition_embed_type") == "text_time" and components.get("text_encoder_2") is not None:
            return "sdxl"
        if (
            config.get("addition_embed_type") is None
            and config.get("encoder_hid_dim") is None
            and components.get("text_encoder") is not None
            and components.get("text_encoder_2") is None
        ):
            return "sd"
    denoiser = next((type(m).__name__ for m in (transformer, unet) if m is not None), "none")
    raise UnsupportedModelError(
        f"{type(pipe).__name__} (denoiser {denoiser}) is not a supported model family; "
        f"attnctrl supports Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 and FLUX pipelines"
    )
