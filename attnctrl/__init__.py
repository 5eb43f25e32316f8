"""attnctrl: training-free attention control for diffusion models (SD, SDXL, SD3, FLUX).

import attnctrl as ac
pipe = ac.load("tiny-sd")
out = pipe("a red car and a white sheep", seed=0, controls=[ac.AttentionMaps()])
"""

from .control import Control
from .controls import (
    PAG,
    AStar,
    AttendExcite,
    AttentionMaps,
    AttentionModulation,
    Conform,
    HeadPerturbation,
    IsolationReposition,
    MutualSelfAttention,
    Panorama,
    SharedAttention,
    StructuredGuidance,
)
from .inversion import InversionResult, ddim_invert, invert_trajectory
from .layers import LayerInfo
from .maps import AttentionMapResult
from .plan import CompositionError
from .selectors import Selector, SelectorError
from .state import BatchLayout, RunContext, StepState

__version__ = "0.1.0"


def load(model=None, **kwargs):
    """A `ControlledPipeline` for an embedded model name, hub id, local directory or diffusers pipeline.

    ``ac.load()`` gives the embedded default model; keyword arguments (``torch_dtype``, ``device``)
    go to the loader.
    """
    from attnctrl.models.loading import EMBEDDED_DEFAULTS, load_pipeline, model_key
    from attnctrl.pipelines import ControlledPipeline

    defaults = EMBEDDED_DEFAULTS.get(model_key(model), {}) if isinstance(model, (str, type(None))) else {}
    return ControlledPipeline(load_pipeline(model, **kwargs), defaults=defaults)


def __getattr__(name):
    # the pipelines layer sits above the core: imported on first use, never by the core itself
    if name in ("ControlledPipeline", "ControlledOutput", "attach"):
        import attnctrl.pipelines as p

        return getattr(p, name)
    raise AttributeError(f"module 'attnctrl' has no attribute {name!r}")


__all__ = [
    "load",
    "attach",
    "AttendExcite",
    "AStar",
    "Conform",
    "Control",
    "AttentionMaps",
    "AttentionModulation",
    "StructuredGuidance",
    "HeadPerturbation",
    "PAG",
    "SharedAttention",
    "IsolationReposition",
    "MutualSelfAttention",
    "Panorama",
    "ddim_invert",
    "invert_trajectory",
    "InversionResult",
    "AttentionMapResult",
    "ControlledPipeline",
    "ControlledOutput",
    "LayerInfo",
    "Selector",
    "SelectorError",
    "CompositionError",
    "BatchLayout",
    "RunContext",
    "StepState",
]
