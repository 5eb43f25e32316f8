"""Attention losses for test-time latent optimisation, on aggregated cross-attention maps.

All functions are differentiable and work on plain tensors, so each is tested on hand-made maps:

* `token_maps`    — Attend-and-Excite's preprocessing: softmax(100·A) over the text tokens without
                    the first (BOS) and last position (or, with ``last=``, over the prompt's own tokens
                    only: A&E's ``normalize_eot`` for SD 2.x), then the maps of the chosen tokens;
* `smooth`        — the reference Gaussian smoothing (kernel 3, σ 0.5, reflect padding);
* `excite_loss`   — Attend-and-Excite (Chefer et al., 2023), Eq. 2: ``max_s (1 − max A_s)``;
* `segregation_loss`, `retention_loss` — A-STAR (Agarwal et al., ICCV 2023), Eq. 2 and Eq. 3;
* `nt_xent_loss`  — CONFORM (Meral et al., CVPR 2024): NT-Xent over map embeddings.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from itertools import combinations
from typing import Literal

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
    maps: torch.Tensor,
    subjects: Sequence[Sequence[int]],
    *,
    softmax_scale: float | None = 100.0,
    last: int | None = None,
) -> torch.Tensor:
    """Per-subject maps (S, H, W) from aggregated cross-attention maps (H, W, T).

    As in Attend-and-Excite, positions ``1 .. last−1`` are kept (the start token and everything
    from `last` on are dropped) and renormalised with ``softmax(softmax_scale · A)`` (None: no
    renormalisation). ``last=None`` is the reference default, the last of the T positions (the
    slice ``1:-1``); ``last=`` the prompt's end-of-text index is the reference's
    ``normalize_eot=True`` (its SD 2.1 setting): the softmax then runs over the prompt's own tokens
    only, not over the end token and the padding. A subject given by several token indices (a word
    split into sub-words) is the sum of their maps.
    """
    end = maps.shape[-1] - 1 if last is None else int(last)
    if not 1 < end <= maps.shape[-1] - 1:
        raise ValueError(
            f"last={last!r}: the kept positions 1..last-1 must be a non-empty part of 1..{maps.shape[-1] - 2}"
        )
    bad = [i for idx in subjects for i in idx if not 1 <= i < end]
    if bad:
        raise ValueError(f"token indices {bad} are outside the renormalised positions 1..{end - 1}")
    text = maps[..., 1:end]
    if softmax_scale is not None:
        text = (text * softmax_scale).softmax(dim=-1)
    return torch.stack([text[..., [i - 1 for i in idx]].sum(-1) for idx in subjects])


def excite_loss(subject_maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite: ``max_s max(0, 1 − max_{ij} A_s[i, j])`` over subject maps (S, H, W)."""
    peaks = subject_maps.flatten(1).max(dim=1).values
    return (1.0 - peaks).clamp(min=0).max(dim=0).values


Reduction = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    return terms.sum() if reduction == "sum" else terms.mean()


def segregation_loss(subject_maps: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """A-STAR attention segregation, paper Eq. 2, over subject maps (S, H, W):

    ``L_seg = Σ_{m>n} Σ_ij min(A_m, A_n)_ij / Σ_ij (A_m + A_n)_ij``

    summed over the subject pairs as the paper writes it (``reduction="mean"``: averaged over the
    pairs instead). Each term is 0 for maps with disjoint support and 0.5 (its maximum) for
    identical maps. Fewer than two subjects: 0.
    """
    _check_reduction(reduction)
    n = subject_maps.shape[0]
    if n < 2:
        return subject_maps.sum() * 0.0
    terms = [
        torch.minimum(subject_maps[m], subject_maps[k]).sum()
        / (subject_maps[m] + subject_maps[k]).sum().clamp_min(1e-12)
        for m, k in combinations(range(n), 2)
    ]
    return _reduce(torch.stack(terms), reduction)


def binarize(subject_maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where a map reaches `threshold` × its own maximum, else 0 (no gradient).

    A-STAR's ``B_t`` (§3.4): the paper binarises "the pixel regions with high activations" without
    a number; the threshold relative to each map's peak is our choice."""
    flat = subject_maps.detach().flatten(1)
    peak = flat.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return (flat >= threshold * peak).to(subject_maps.dtype).view_as(subject_maps)


RetentionForm = Literal["paper", "soft-iou"]
RETENTION_FORMS: tuple[str, ...] = typing.get_args(RetentionForm)


def retention_loss(
    subject_maps: torch.Tensor, previous_masks: torch.Tensor, *, form: str = "paper", reduction: str = "sum"
) -> torch.Tensor:
    """A-STAR attention retention between the current maps and the previous step's binary masks.

    ``form="paper"`` is the paper's Eq. 3, with ``A`` the current map (the paper's ``A_{t−1}``) and
    ``B`` the binarised map of the previous step (its ``B_t``, see `binarize`):

    ``L_ret = Σ_m [1 − Σ_ij min(A_m, B_m)_ij / Σ_ij (A_m + B_m)_ij]``

    summed over the subjects (``reduction="mean"``: averaged). Each term is 1 when the map leaves
    its mask and 0.5 at best (``A_m = B_m``); for maps below 1 it is ``1 − Σ_{B} A / (Σ A + |B|)``.

    ``form="soft-iou"`` is attnctrl's earlier reading, kept as an option: ``1 − Σ a·B / Σ (a + B − a·B)``
    with the current map rescaled to a peak of 1 (``a = A / max A``): 0 when that equals the mask.
    """
    _check_reduction(reduction)
    b = previous_masks.flatten(1).to(subject_maps)
    a = subject_maps.flatten(1)
    if form == "paper":
        ratio = torch.minimum(a, b).sum(1) / (a + b).sum(1).clamp_min(1e-12)
    elif form == "soft-iou":
        a = a / a.max(dim=1, keepdim=True).values.clamp_min(1e-12)
        ratio = (a * b).sum(1) / (a + b - a * b).sum(1).clamp_min(1e-12)
    else:
        raise ValueError(f"retention form must be one of {RETENTION_FORMS}, got {form!r}")
    return _reduce(1.0 - ratio, reduction)


def nt_xent_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (Sohn 2016; Chen et al. 2020) over (N, D) embeddings with integer class labels.

    Cosine similarities s/τ. For every ordered positive pair (a, p), a ≠ p with the same label:
    ``−log( e^{s_ap} / (e^{s_ap} + Σ_{n: label_n ≠ label_a} e^{s_an}) )``, averaged over the pairs.
    No positive pair, or no negative at all (one class): 0. This is
    ``pytorch_metric_learning.losses.NTXentLoss(temperature=τ)`` with its default cosine similarity
    and mean reduction, which CONFORM's reference calls (checked in the tests).
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
