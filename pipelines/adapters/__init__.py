"""One small adapter per model family; see `base.Adapter`."""

from .base import Adapter, Prepared
from .controlnet import SDControlNetAdapter
from .flux import FluxAdapter
from .image_kinds import SDImg2ImgAdapter, SDInpaintAdapter, SDXLImg2ImgAdapter, SDXLInpaintAdapter
from .sd import SDAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter

ADAPTERS = {"sd": SDAdapter, "sdxl": SDXLAdapter, "sd3": SD3Adapter, "flux": FluxAdapter}

#: the diffusers pipeline classes `ControlledPipeline` runs, by class name (a subclass counts), and their adapter
PIPELINE_ADAPTERS: dict[str, type[Adapter]] = {
    "StableDiffusionPipeline": SDAdapter,
    "StableDiffusionImg2ImgPipeline": SDImg2ImgAdapter,
    "StableDiffusionInpaintPipeline": SDInpaintAdapter,
    "StableDiffusionControlNetPipeline": SDControlNetAdapter,
    "StableDiffusionXLPipeline": SDXLAdapter,
    "StableDiffusionXLImg2ImgPipeline": SDXLImg2ImgAdapter,
    "StableDiffusionXLInpaintPipeline": SDXLInpaintAdapter,
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
}


def adapter_for(pipe) -> type[Adapter] | None:
    """The adapter class for a pipeline object: its own class or the nearest base class listed."""
    return next((PIPELINE_ADAPTERS[c.__name__] for c in type(pipe).__mro__ if c.__name__ in PIPELINE_ADAPTERS), None)


def class_for(family: str, kind: str) -> str | None:
    """The diffusers pipeline class name of a family's kind ("img2img", "inpaint", ...), None if none is listed."""
    return next((k for k, a in PIPELINE_ADAPTERS.items() if a.family == family and a.kind == kind), None)


__all__ = ["Adapter", "Prepared", "ADAPTERS", "PIPELINE_ADAPTERS", "adapter_for", "class_for"]
