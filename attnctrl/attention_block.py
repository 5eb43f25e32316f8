"""Attention probabilities of one block (rows × queries × keys), in bounded memory.

A control that only reads probabilities declares the block it reads (`ProbsBlock`, from
`Control.reads`); `attend` then computes just that block with `block_probs` while the layer's
output stays the fused kernel's. The block is normalised as the layer's own softmax is, over
*all* keys: each query chunk's logits against every key give its log-sum-exp, and only the
block's keys are kept, so no (queries × keys) matrix of the whole layer is ever held; the chunk
size follows a memory budget (`PROBS_BUDGET_BYTES`, env ``ATTNCTRL_PROBS_BUDGET_MB``).
Probabilities are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

#: bytes of float32 logits one chunk of `block_probs` may hold (default 256 MiB)
PROBS_BUDGET_BYTES = int(float(os.environ.get("ATTNCTRL_PROBS_BUDGET_MB", "256")) * 2**20)


@dataclass(frozen=True)
class ProbsBlock:
    """The part of a layer's probabilities a control reads: batch `rows`, `queries`, `keys`, and
    `heads` (None: all), averaged over those heads (``(rows, queries, keys)``) when `mean_heads`,
    else ``(rows, heads, queries, keys)``."""

    rows: slice
    queries: slice
    keys: slice
    heads: tuple[int, ...] | None = None
    mean_heads: bool = True


def query_chunk(rows: int, heads: int, keys: int, budget: int | None = None) -> int:
    """Queries per chunk so that one chunk's float32 logits and probabilities (2 × rows × heads ×
    chunk × keys × 4 bytes) stay within `budget` (at least one query)."""
    budget = PROBS_BUDGET_BYTES if budget is None else budget
    return max(1, budget // max(1, 8 * rows * heads * keys))


def _bias_block(bias: torch.Tensor | None, rows: slice, heads: list[int] | None, batch: int) -> torch.Tensor | None:
    """The layer's additive bias for `rows` and `heads` (broadcast dimensions stay broadcast)."""
    if bias is None:
        return None
    b = bias
    while b.dim() < 4:
        b = b.unsqueeze(0)
    if b.shape[0] == batch:
        b = b[rows]
    if heads is not None and b.shape[1] != 1:
        b = b[:, heads]
    return b


def block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    block: ProbsBlock,
    budget: int | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) over all keys, restricted to `block`, in float32.

    q: (B, H, Lq, D), k: (B, H, Lk, D), bias broadcastable to (B, H, Lq, Lk). Equals slicing the
    full probability matrix, computed one query chunk at a time (`query_chunk`)."""
    heads = list(block.heads) if block.heads is not None else None
    qb, kb = q[block.rows], k[block.rows]
    if heads is not None:
        qb, kb = qb[:, heads], kb[:, heads]
    qb = qb[:, :, block.queries]
    kf = kb.float()
    bb = _bias_block(bias, block.rows, heads, q.shape[0])
    q0 = block.queries.start or 0
    rows, h, nq = qb.shape[0], qb.shape[1], qb.shape[2]
    nk = kb.shape[2]
    width = len(range(nk)[block.keys])
    step = query_chunk(rows, h, nk, budget)
    shape = (rows, nq, width) if block.mean_heads else (rows, h, nq, width)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        logits = torch.matmul(qb[:, :, s:e].float(), kf.transpose(-1, -2)) * scale
        if bb is not None:
            part = bb if bb.shape[2] == 1 else bb[:, :, q0 + s : q0 + e]
            logits = logits + part.float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        p = torch.exp(logits[..., block.keys] - lse)
        if block.mean_heads:
            out[:, s:e] = p.mean(dim=1)
        else:
            out[:, :, s:e] = p
    return out


__all__ = ["PROBS_BUDGET_BYTES", "ProbsBlock", "block_probs", "query_chunk"]
