"""Attention processors: one per architecture, each normalising a diffusers call to an
`attnctrl.attention.AttentionCall` and running the controls planned for that layer."""

from .flux import FluxAttnProcessor
from .install import PROCESSORS, installed
from .sd3 import SD3JointAttnProcessor
from .unet import UNetAttnProcessor

__all__ = ["UNetAttnProcessor", "SD3JointAttnProcessor", "FluxAttnProcessor", "PROCESSORS", "installed"]
