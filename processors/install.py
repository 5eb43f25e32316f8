"""Install controlled processors on the layers a run uses, and put the originals back.

Only layers with at least one planned control get a controlled processor; every other layer
keeps its stock processor object, so it computes exactly what it computed before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch.nn as nn

from attnctrl.layers import LayerInfo
from attnctrl.state import RunContext

from .flux import FluxAttnProcessor
from .sd3 import SD3JointAttnProcessor
from .unet import UNetAttnProcessor

PROCESSORS = {
    "sd": UNetAttnProcessor,
    "sdxl": UNetAttnProcessor,
    "sd3": SD3JointAttnProcessor,
    "flux": FluxAttnProcessor,
}


def _set(module: nn.Module, processor) -> None:
    # direct assignment: `set_processor` may log or re-register modules; we only swap the callable
    if isinstance(module.processor, nn.Module) or isinstance(processor, nn.Module):
        # a method of diffusers' attention modules (`nn.Module` types unknown attributes as Tensor | Module)
        set_processor = cast(Callable[[object], None], module.set_processor)
        set_processor(processor)
    else:
        module.processor = processor


@contextmanager
def installed(denoiser: nn.Module, run: RunContext, layers: list[LayerInfo]) -> Iterator[None]:
    """Within the block, `layers` of `denoiser` run through attnctrl processors bound to `run`.

    On exit, also after an exception, every original processor object is restored.
    """
    cls = PROCESSORS[run.family]
    originals = {}
    try:
        for layer in layers:
            module = denoiser.get_submodule(layer.name)
            originals[layer.name] = module.processor
            _set(module, cls(module.processor, layer, run))
        yield
    finally:
        for name, proc in originals.items():
            _set(denoiser.get_submodule(name), proc)
