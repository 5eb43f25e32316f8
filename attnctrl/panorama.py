"""Panorama arithmetic: views of a latent canvas, their merge weights, and MAD's merged attention.

MultiDiffusion (Bar-Tal et al. 2023, Eq. 3-5) denoises crops ("views") F_i(J) of a wide latent
canvas J with the stock model and, at every step, takes the least-squares fusion of the views'
results: per canvas pixel, the W_i-weighted average of the views that contain it (uniform W_i, as
the paper's panoramas, so w_i(p) = 1 / #views containing p). MAD (Merge-Attend-Diffuse,
Quattrini et al. 2024, §3.2) also merges inside the attention layers: the views' queries, keys
and values are averaged into the canvas the same way, attention is computed over the whole merged
canvas, and the canvas output is split back into the views.

Views are given in latent pixels; a layer with downsampling factor f sees them at 1/f. Circular
(360°) panoramas wrap the views around the canvas's width, so the canvas is a cylinder.

Memory: merged self-attention over N canvas tokens holds the canvas's q, k, v (3·N·C per batch
row) and, when N exceeds `chunk`, computes one batch row and `chunk` queries at a time, so the
logits are at most chunk·N per head (SDPA's fused kernels may need less): SD 2 at 512×2048 px has
N = 64·256 = 16384 tokens at its full-resolution layers, 5 heads, so a 4096-query chunk in float32
is 4096·16384·5·4 B ≈ 1.3 GB at most, against 5.4 GB per row (10.7 GB with CFG) unchunked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["Views", "make_views", "merged_attention", "merged_cross_attention"]


@dataclass
class Views:
    """Views of a (height × width) latent canvas, each (view_h × view_w) at `starts` (row, col)."""

    height: int
    width: int
    view_h: int
    view_w: int
    starts: list[tuple[int, int]]
    circular: bool = False
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.starts)

    def index(self, factor: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """(V, view tokens) flat canvas indices of every view's tokens at downsampling `factor`."""
        key = (factor, str(device))
        if key not in self._index:
            for n, what in ((self.height, "height"), (self.width, "width"), (self.view_h, "view height")):
                if n % factor:
                    raise ValueError(f"panorama {what} {n} is not divisible by the layer factor {factor}")
            if any(h % factor or w % factor for h, w in self.starts):
                raise ValueError(f"panorama view starts {self.starts} are not divisible by the layer factor {factor}")
            w_canvas = self.width // factor
            rows = torch.arange(self.view_h // factor)
            cols = torch.arange(self.view_w // factor)
            idx = []
            for h0, w0 in self.starts:
                r = rows + h0 // factor
                c = (cols + w0 // factor) % w_canvas  # only wraps for circular views
                idx.append((r[:, None] * w_canvas + c[None, :]).reshape(-1))
            self._index[key] = torch.stack(idx).to(device)
        return self._index[key]

    def tokens(self, factor: int = 1) -> int:
        return (self.height // factor) * (self.width // factor)

    def factor_of(self, view_tokens: int) -> int:
        """The layer factor at which one view has `view_tokens` tokens."""
        f = round(math.sqrt(self.view_h * self.view_w / view_tokens))
        if f < 1 or (self.view_h // f) * (self.view_w // f) != view_tokens:
            raise ValueError(f"{view_tokens} tokens is not a {self.view_h}×{self.view_w} view at any layer factor")
        return f

    def counts(self, factor: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """(canvas tokens,) how many views contain each canvas token."""
        idx = self.index(factor, device).reshape(-1)
        return torch.zeros(self.tokens(factor), device=device).index_add_(
            0, idx, torch.ones_like(idx, dtype=torch.float)
        )

    def weights(self, factor: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """(V, view tokens) MultiDiffusion's uniform merge weights w_i(p) = 1 / #views at p (Eq. 5)."""
        return (1.0 / self.counts(factor, device))[self.index(factor, device)]

    def crop(self, canvas: torch.Tensor, which: range | None = None) -> torch.Tensor:
        """Views of `canvas` (B, C, H, W) → (B · V, C, view_h, view_w), image-major then view."""
        b, c = canvas.shape[:2]
        idx = self.index(1, canvas.device)
        if which is not None:
            idx = idx[which.start : which.stop]
        x = canvas.reshape(b, c, -1)[:, :, idx]  # (B, C, V, L)
        return x.permute(0, 2, 1, 3).reshape(b * idx.shape[0], c, self.view_h, self.view_w)

    def merge(self, views: torch.Tensor, factor: int = 1, which: range | None = None) -> torch.Tensor:
        """Weighted sum into the canvas of `views` (G, V', L, C) (views `which`, default all): (G, N, C).

        With all views, the weights sum to 1 per token and this is the MultiDiffusion average."""
        idx = self.index(factor, views.device)
        w = self.weights(factor, views.device)
        if which is not None:
            idx, w = idx[which.start : which.stop], w[which.start : which.stop]
        g, v, n_tok, c = views.shape
        out = views.new_zeros(g, self.tokens(factor), c)
        weighted = (views * w[None, :, :, None].to(views.dtype)).reshape(g, v * n_tok, c)
        return out.index_add_(1, idx.reshape(-1), weighted)

    def split(self, canvas: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """Canvas tokens (G, N, C) → every view's tokens (G, V, L, C)."""
        return canvas[:, self.index(factor, canvas.device)]


def make_views(height: int, width: int, view: int | tuple[int, int], stride: int, circular: bool = False) -> Views:
    """MultiDiffusion's views of a height × width latent canvas (diffusers' `get_views`): a grid of
    view-sized crops every `stride` latents; a side no longer than the view gets one view covering it.

    Without `circular`, a last view flush with the far edge is added where the grid stops short,
    so every latent is in some view (the stock grid leaves such a strip at zero). With `circular`
    the views start at every multiple of `stride` across the width and wrap around it."""
    vh, vw = (view, view) if isinstance(view, int) else view
    vh, vw = min(vh, height), min(vw, width)
    if stride < 1:
        raise ValueError(f"panorama stride must be at least 1 latent, got {stride}")

    def starts(size: int, v: int, wrap: bool) -> list[int]:
        if wrap and size > v:
            if size % stride:
                raise ValueError(f"a circular panorama needs a width ({size} latents) divisible by the stride {stride}")
            return list(range(0, size, stride))
        out = list(range(0, size - v + 1, stride))
        if out[-1] + v < size:
            out.append(size - v)
        return out

    if circular and stride > vw:
        raise ValueError(f"circular views of width {vw} every {stride} latents leave gaps: use stride <= view")
    rows, cols = starts(height, vh, False), starts(width, vw, circular)
    return Views(height, width, vh, vw, [(r, c) for r in rows for c in cols], circular)


def merged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, views: Views, scale: float | None, chunk: int = 4096
) -> torch.Tensor:
    """MAD's self-attention (§3.2): views' q, k, v (G, V, H, L, D) averaged into the canvas,
    attention over all canvas tokens (queries in chunks of `chunk`; exact, softmax rows are
    independent), the canvas output split back into the views: (G, V, H, L, D)."""
    g, n_views, heads, n_tok, d = q.shape
    f = views.factor_of(n_tok)

    def canvas(x: torch.Tensor) -> torch.Tensor:  # (G, V, H, L, D) -> (G, H, N, D)
        flat = x.permute(0, 1, 3, 2, 4).reshape(g, n_views, n_tok, heads * d)
        return views.merge(flat, f).reshape(g, -1, heads, d).transpose(1, 2)

    cq, ck, cv = canvas(q), canvas(k), canvas(v)
    n = cq.shape[2]
    if n <= chunk:  # one call over the batch, as the stock layer makes it
        return _split_heads(F.scaled_dot_product_attention(cq, ck, cv, scale=scale), views, f, heads, d)
    out = torch.empty_like(cq)
    for r in range(g):  # one batch row and `chunk` queries at a time: chunk·N logits per head at most
        for s in range(0, n, chunk):
            out[r : r + 1, :, s : s + chunk] = F.scaled_dot_product_attention(
                cq[r : r + 1, :, s : s + chunk], ck[r : r + 1], cv[r : r + 1], scale=scale
            )
    return _split_heads(out, views, f, heads, d)


def merged_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, views: Views, scale: float | None, mask=None
) -> torch.Tensor:
    """MAD's cross-attention: views' queries (G, V, H, L, D) averaged into the canvas attend to the
    group's text keys/values k, v (G, H, T, D); the canvas output is split back: (G, V, H, L, D)."""
    g, n_views, heads, n_tok, d = q.shape
    f = views.factor_of(n_tok)
    flat = q.permute(0, 1, 3, 2, 4).reshape(g, n_views, n_tok, heads * d)
    cq = views.merge(flat, f).reshape(g, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(cq, k, v, attn_mask=mask, scale=scale)
    return _split_heads(out, views, f, heads, d)


def _split_heads(out: torch.Tensor, views: Views, f: int, heads: int, d: int) -> torch.Tensor:
    g = out.shape[0]
    tokens = views.split(out.transpose(1, 2).reshape(g, -1, heads * d), f)  # (G, V, L, H·D)
    return tokens.reshape(*tokens.shape[:3], heads, d).permute(0, 1, 3, 2, 4)
