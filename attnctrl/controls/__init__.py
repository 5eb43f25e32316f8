"""The controls: one file per method."""
from .maps import AttentionMaps
from .perturbation import PAG, HeadPerturbation

__all__ = ["AttentionMaps", "HeadPerturbation", "PAG"]
