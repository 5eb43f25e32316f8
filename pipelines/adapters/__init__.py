"""One small adapter per model family; see `base.Adapter`."""

from .base import Adapter, Prepared
from .flux import FluxAdapter
from .sd import SDAdapter
from .sd3 import SD3Adapter
from .sdxl import SDXLAdapter

ADAPTERS = {"sd": SDAdapter, "sdxl": SDXLAdapter, "sd3": SD3Adapter, "flux": FluxAdapter}

__all__ = ["Adapter", "Prepared", "ADAPTERS"]
