"""`ControlledPipeline` (the one denoising loop, with per-family adapters) and `attach` (attention-level
controls on an unmodified diffusers pipeline)."""

from .attach import AttachSession, attach
from .controlled import ControlledOutput, ControlledPipeline

__all__ = ["ControlledPipeline", "ControlledOutput", "attach", "AttachSession"]
