"""The user's attention backend (``set_attention_backend`` / ``attention_backend(...)``) on the
layers attnctrl controls, for models whose processors call diffusers' ``dispatch_attention_fn``.

`user_backend` gives `AttentionCall.backend`: None where the backend is diffusers' default
("native", PyTorch's SDPA, which `attend` calls itself), else a function that runs the same
backend on (B, H, L, D) tensors. `attend` uses it on calls that need nothing the backend cannot
give (no mask, no probabilities), and otherwise logs once that the layer runs native SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn


class _Backend:
    """``backend(q, k, v, scale)`` on (B, H, L, D) tensors through ``dispatch_attention_fn``."""

    def __init__(self, name: AttentionBackendName):
        self.name = name.value

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
        out = dispatch_attention_fn(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            scale=scale,
            backend=AttentionBackendName(self.name),
        )
        return out.transpose(1, 2)


def user_backend(original: Any) -> _Backend | None:
    """The backend the model's own processor `original` would use, unless it is the default."""
    backend = getattr(original, "_attention_backend", None)
    if backend is None:
        backend = _AttentionBackendRegistry.get_active_backend()[0]
    name = AttentionBackendName(backend)
    return None if name == AttentionBackendName.NATIVE else _Backend(name)


__all__ = ["user_backend"]
