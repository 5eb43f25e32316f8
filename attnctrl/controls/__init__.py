"""The controls: one file per method."""
from .maps import AttentionMaps

__all__ = ["AttentionMaps"]
