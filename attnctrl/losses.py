"""Attention losses for test-time latent optimisation, on aggregated cross-attention maps.

All functions are differentiable and work on plain tensors, so each is tested on hand-made maps:

* `token_maps`    — Attend-and-Excite's preprocessing: softmax(100·A) over the text tokens without
                    the first (BOS) and last position, then the maps of the chosen tokens;
* `smooth`        — the reference Gaussian smoothing (kernel 3, σ 0.5, reflect padding);
* `excite_loss`   — Attend-and-Excite (Chefer et al., 2023), Eq. 2: ``max_s (1 − max A_s)``;
* `segregation_loss`, `retention_loss` — A-STAR (Agarwal et al., ICCV 2023);
* `nt_xent_loss`  — CONFORM (Meral et al., CVPR 2024): NT-Xent over map embeddings.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import torch
import torch.nn.functional as F

_KERNELS: dict[tuple, torch.Tensor] = {}


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The (size × size) smoothing kernel of the Attend-and-Excite reference, normalised to sum 1.

    The reference writes the exponent as ``-((x − μ) / (2σ))²``; we keep that form so results match.
    """
    key = (size, float(sigma))
    k = _KERNELS.get(key)
    if k is None:
        x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-((x / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
        k = _KERNELS[key] = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    return k


def smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian-smooth maps of shape (..., H, W) with reflect padding; same shape out."""
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, gaussian_kernel(size, sigma).to(x)[None, None])
    return x.reshape(*lead, h, w)


def token_maps(
    maps: torch.Tensor, subjects: Sequence[Sequence[int]], *, softmax_scale: float | None = 100.0
) -> torch.Tensor:
    """Per-subject maps (S, H, W) from aggregated cross-attention maps (H, W, T).

    As in Attend-and-Excite, the first and the last of the T positions are dropped and the rest
    renormalised with ``softmax(softmax_scale · A)`` (None: no renormalisation). A subject given by
    several token indices (a word split into sub-words) is the sum of their maps.
    """
    text = maps[..., 1:-1]
    if softmax_scale is not None:
        text = (text * softmax_scale).softmax(dim=-1)
    return torch.stack([text[..., [i - 1 for i in idx]].sum(-1) for idx in subjects])


def excite_loss(subject_maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite: ``max_s max(0, 1 − max_{ij} A_s[i, j])`` over subject maps (S, H, W)."""
    peaks = subject_maps.flatten(1).max(dim=1).values
    return (1.0 - peaks).clamp(min=0).max(dim=0).values


def segregation_loss(subject_maps: torch.Tensor) -> torch.Tensor:
    """A-STAR segregation: mean over subject pairs (m, n) of ``Σ min(A_m, A_n) / Σ (A_m + A_n)``.

    0 for maps with disjoint support; 0.5 (its maximum) for identical maps. Fewer than two
    subjects: 0.
    """
    pairs = list(combinations(range(subject_maps.shape[0]), 2))
    if not pairs:
        return subject_maps.sum() * 0.0
    terms = [
        torch.minimum(subject_maps[m], subject_maps[n]).sum() / (subject_maps[m] + subject_maps[n]).sum().clamp_min(1e-12)
        for m, n in pairs
    ]
    return torch.stack(terms).mean()


def binarize(subject_maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where a map reaches `threshold` × its own maximum, else 0 (no gradient)."""
    flat = subject_maps.detach().flatten(1)
    peak = flat.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return (flat >= threshold * peak).to(subject_maps.dtype).view_as(subject_maps)


def retention_loss(subject_maps: torch.Tensor, previous_masks: torch.Tensor) -> torch.Tensor:
    """A-STAR retention: mean over subjects of ``1 − soft-IoU(A_s / max A_s, B_s)``.

    ``B_s`` is the binarised map of the previous step (`binarize`); 0 when the current map,
    scaled to a peak of 1, equals that mask; 1 when they do not overlap.
    """
    a = subject_maps.flatten(1)
    a = a / a.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    b = previous_masks.flatten(1).to(a)
    inter = (a * b).sum(1)
    union = (a + b - a * b).sum(1).clamp_min(1e-12)
    return (1.0 - inter / union).mean()


def nt_xent_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Sohn 2016; Chen et al. 2020) over (N, D) embeddings with integer class labels.

    Cosine similarities s/τ. For every ordered positive pair (a, p), a ≠ p with the same label:
    ``−log( e^{s_ap} / (e^{s_ap} + Σ_{n: label_n ≠ label_a} e^{s_an}) )``, averaged over the pairs.
    No positive pair: 0.
    """
    z = F.normalize(embeddings.flatten(1), dim=1)
    sim = z @ z.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not bool(pos.any()):
        return sim.sum() * 0.0
    neg = ~same
    # log Σ_n e^{s_an} over the negatives of each anchor (−inf when it has none)
    neg_lse = torch.logsumexp(sim.masked_fill(~neg, float("-inf")), dim=1, keepdim=True)
    a, p = pos.nonzero(as_tuple=True)
    s_ap = sim[a, p]
    denom = torch.logaddexp(s_ap, neg_lse[a, 0])
    return (denom - s_ap).mean()
