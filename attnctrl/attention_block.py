"""Attention probabilities of one block (rows × queries × keys), in bounded memory.

A control that only reads probabilities declares the block it reads (`ProbsBlock`, from
`Control.reads`); `attend` then computes just that block with `block_probs` while the layer's
output stays the fused kernel's. The block is normalised as the layer's own softmax is, over
*all* keys, by each query's log-sum-exp: the fused kernel's own (`sdpa_with_lse`: PyTorch's CPU
flash kernel returns it with an output bit-identical to SDPA's), so only the block's logits are
computed; else each query chunk's logits against every key give it. No (queries × keys) matrix of
the whole layer is ever held; the chunk size follows a memory budget (`PROBS_BUDGET_BYTES`, env
``ATTNCTRL_PROBS_BUDGET_MB``). Probabilities are computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .attention import AttentionCall

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


def image_text_block(call: AttentionCall, heads: tuple[int, ...] | None = None) -> ProbsBlock | None:
    """The block map readers take: the conditional rows' image queries × text keys, head-averaged;
    None on a call with no text keys or no conditional rows, or in a pass with gradients (the
    latent optimisers' passes are not part of any record)."""
    if call.k_text is None or torch.is_grad_enabled() or not call.run.layout.has("cond"):
        return None
    return ProbsBlock(call.run.layout.rows("cond"), call.q_image, call.k_text, heads)


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


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """SDPA's output and each query's log-sum-exp over all keys, (B, H, Lq) float32, from one fused
    kernel call, where PyTorch has one whose output is SDPA's own (CPU flash attention); else None."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if v.shape[-1] != q.shape[-1] or (bias is not None and bias.dtype not in (q.dtype, torch.bool)):
        return None
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=bias, scale=scale
        )
    except (RuntimeError, NotImplementedError):  # shapes or masks this kernel does not take
        return None
    return out, lse


def block_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    block: ProbsBlock,
    budget: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) over all keys, restricted to `block`, in float32.

    q: (B, H, Lq, D), k: (B, H, Lk, D), bias broadcastable to (B, H, Lq, Lk); `lse` (B, H, Lq): each
    query's log-sum-exp over all keys when the caller has it (then only the block's keys are
    multiplied). Equals slicing the full probability matrix, one query chunk at a time (`query_chunk`)."""
    heads = list(block.heads) if block.heads is not None else None
    qb, kb = q[block.rows], k[block.rows]
    lb = lse[block.rows] if lse is not None else None
    if heads is not None:
        qb, kb = qb[:, heads], kb[:, heads]
        lb = lb[:, heads] if lb is not None else None
    qb = qb[:, :, block.queries]
    lb = lb[:, :, block.queries].float() if lb is not None else None
    kf = kb.float() if lb is None else kb[:, :, block.keys].float()
    bb = _bias_block(bias, block.rows, heads, q.shape[0])
    if bb is not None and lb is not None and bb.shape[-1] != 1:
        bb = bb[..., block.keys]
    q0 = block.queries.start or 0
    rows, h, nq = qb.shape[0], qb.shape[1], qb.shape[2]
    width = len(range(kb.shape[2])[block.keys])
    step = query_chunk(rows, h, kf.shape[2], budget)
    shape = (rows, nq, width) if block.mean_heads else (rows, h, nq, width)
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    for s in range(0, nq, step):
        e = min(nq, s + step)
        logits = torch.matmul(qb[:, :, s:e].float() * scale, kf.transpose(-1, -2))  # in place from here on
        if bb is not None:
            part = bb if bb.shape[2] == 1 else bb[:, :, q0 + s : q0 + e]
            logits.add_(part.float())
        if lb is not None:
            p = logits.sub_(lb[:, :, s:e, None]).exp_()
        else:
            p = torch.exp(logits[..., block.keys] - torch.logsumexp(logits, dim=-1, keepdim=True))
        if block.mean_heads:
            out[:, s:e] = p.mean(dim=1)
        else:
            out[:, :, s:e] = p
    return out


__all__ = ["PROBS_BUDGET_BYTES", "ProbsBlock", "block_probs", "image_text_block", "query_chunk", "sdpa_with_lse"]
