"""FLUX's rotary position embedding (RoPE) on already projected queries and keys: the one home of
the rotation the controls apply, undo or redo (SharedAttention's ShiftPE and AdaIN before RoPE,
IsolationReposition's moved keys, SynPS's scaled positions).

The rotation is diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)``
(interleaved pairs ``(x_2i, x_2i+1)``), computed the same way in float32. That function is not used
itself because it expands (L, D) tables only (``sequence_dim`` picks where it adds two axes); the
controls also rotate with per-row tables, e.g. (B, 1, N, D) gathered at each row's own positions.
Rotations compose: ``rotate(rotate(x, c1, s1), c2, s2)`` turns by the sum of the angles, and
``rotate(x, cos, -sin)`` undoes ``rotate(x, cos, sin)``.
"""

from __future__ import annotations

import torch

__all__ = ["rerotate", "rotate"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x` (…, L, D) rotated by (cos, sin) broadcastable to it (e.g. (L, D), (1, D) or (B, 1, L, D)).

    In float32, cast back to x's dtype, as `diffusers.models.embeddings.apply_rotary_emb`."""
    re, im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-im, re], dim=-1).flatten(-2)
    return (x.float() * cos + turned * sin).to(x.dtype)


def rerotate(
    x: torch.Tensor, old: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """`x` rotated by the (cos, sin) tables `old` turned back, then rotated by `new`: RoPE moved from
    one set of positions to another."""
    return rotate(rotate(x, old[0], -old[1]), new[0], new[1])
