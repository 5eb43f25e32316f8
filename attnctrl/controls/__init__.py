"""The controls: one file per method."""

from .astar import AStar
from .conform import Conform
from .excite import AttendExcite
from .isolation import IsolationReposition
from .maps import AttentionMaps
from .modulation import AttentionModulation
from .mutual import MutualSelfAttention
from .panorama import Panorama
from .perturbation import PAG, HeadPerturbation
from .shared import SharedAttention
from .structured import StructuredGuidance

__all__ = [
    "AStar",
    "AttendExcite",
    "Conform",
    "AttentionMaps",
    "AttentionModulation",
    "HeadPerturbation",
    "IsolationReposition",
    "MutualSelfAttention",
    "Panorama",
    "PAG",
    "SharedAttention",
    "StructuredGuidance",
]
