"""`ControlledPipeline` and the per-family adapters it uses."""
from .controlled import ControlledOutput, ControlledPipeline

__all__ = ["ControlledPipeline", "ControlledOutput"]
