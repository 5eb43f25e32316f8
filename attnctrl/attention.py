"""`AttentionCall`, the normalised view of one attention call, and `attend`, which runs a chain of
controls over it.

Observers (`Control.reads` / `observe`) get the block of probabilities they declare, computed in
bounded memory (`attention_block.block_probs`) beside the layer's fused SDPA, whose output they
leave untouched; only controls that edit probabilities (`probs`) make the layer explicit.

Every processor (UNet, SD3 joint, FLUX) turns its diffusers call into an `AttentionCall` with
q, k, v of shape (batch, heads, tokens, head_dim) and the slices telling which query/key tokens
are image and which are text, then calls `attend`. `attend` uses SDPA unless a control on the
layer needs explicit probabilities (DESIGN rule 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .attention_block import ProbsBlock, block_probs, sdpa_with_lse
from .layers import LayerInfo
from .state import RunContext

Chain = list  # list[tuple[Control, frozenset[int] | None]]
logger = logging.getLogger("attnctrl")


@dataclass
class AttentionCall:
    """One attention call, normalised.

    q, k, v: (B, H, Lq, D) / (B, H, Lk, D), after the model's own norms and rotary embedding.
    q_image / k_image: slices of image tokens among queries / keys; q_text / k_text: text tokens
    (None when the layer has no text, e.g. self-attention). grid: (h, w) of the image tokens.
    heads: head restriction of the control whose hook is being called (None = all heads).
    mask: additive mask passed by the model (or None). scale: softmax scale of the layer.
    """

    layer: LayerInfo
    run: RunContext
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_image: slice
    k_image: slice
    grid: tuple[int, int]
    scale: float
    q_text: slice | None = None
    k_text: slice | None = None
    mask: torch.Tensor | None = None
    module: Any = None
    heads: frozenset[int] | None = None
    extras: dict = field(default_factory=dict)
    #: the user's attention backend for this layer, when it is not PyTorch's SDPA: ``backend(q, k, v,
    #: scale)`` → (B, H, Lq, D), with its name in ``backend.name`` (set by processors, see `attend`)
    backend: Any = None

    @property
    def batch(self) -> int:
        return self.q.shape[0]


def layer_scale(attn: Any) -> float:
    """The softmax scale of a diffusers attention module: its ``scale`` (``Attention``: ``dim_head**-0.5``,
    or 1.0 without ``scale_qk``), else ``head_dim**-0.5`` (``FluxAttention`` has no ``scale``; its
    processor lets SDPA use the default)."""
    scale = getattr(attn, "scale", None)
    return scale if scale is not None else attn.head_dim**-0.5


def sdpa_scale(scale: float, head_dim: int) -> float | None:
    """The ``scale=`` to give SDPA for a layer with softmax scale `scale`: None (SDPA's own default,
    as the model's processor calls it, so outputs match bit for bit) when `scale` is the default
    ``head_dim**-0.5``, else `scale`."""
    return None if abs(scale - head_dim**-0.5) < 1e-12 else scale


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) over keys, computed in float32 and cast back to q's dtype."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1).to(q.dtype)


def _sdpa(call: AttentionCall, bias: torch.Tensor | None, skip: slice | None = None) -> torch.Tensor:
    """SDPA over the batch; rows in `skip` (whose output a control replaces whole) are left at zero."""
    scale = sdpa_scale(call.scale, call.q.shape[-1])
    if skip is None:
        return F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=bias, dropout_p=0.0, scale=scale)
    out = call.q.new_zeros(call.q.shape[:-1] + call.v.shape[-1:])
    for rows in (slice(0, skip.start), slice(skip.stop, call.batch)):
        if rows.stop > rows.start:
            b = bias[rows] if bias is not None and bias.dim() == 4 and bias.shape[0] == call.batch else bias
            out[rows] = F.scaled_dot_product_attention(
                call.q[rows], call.k[rows], call.v[rows], attn_mask=b, dropout_p=0.0, scale=scale
            )
    return out


def attend(call: AttentionCall, chain: Chain) -> torch.Tensor:
    """Run `chain` (controls in the user's order, each with its heads) over `call`; return B×H×Lq×D."""
    for control, heads in chain:
        if control.implements("qkv"):
            call.heads = heads
            control.qkv(call)
    bias = call.mask
    for control, heads in chain:
        if control.implements("bias"):
            call.heads = heads
            b = control.bias(call)
            if b is not None:
                bias = b if bias is None else bias + b
    readers: list = []
    observed: list[tuple[ProbsBlock, list]] = []  # one computation per distinct block, shared
    for control, heads in chain:
        call.heads = heads
        if control.implements("observe"):
            block = control.reads(call)
            if block is not None:
                same = next((obs for b, obs in observed if b == block), None)
                if same is None:
                    observed.append((block, [(control, heads)]))
                else:
                    same.append((control, heads))
        if control.needs_probs(call):
            readers.append((control, heads))
    lse, on_backend = None, False
    if readers:
        p = attention_probs(call.q, call.k, call.scale, bias)
        for control, heads in readers:
            call.heads = heads
            p = control.probs(call, p)
        # observers only (e.g. maps): the output stays SDPA's, bit for bit
        o = _sdpa(call, bias) if all(c.observes_only for c, _ in readers) else torch.matmul(p, call.v)
    else:
        skip = None
        for control, heads in chain:
            if control.implements("replaced_rows"):
                call.heads = heads
                skip = control.replaced_rows(call) or skip
        fused = None
        if observed and skip is None:  # the output and every query's log-sum-exp from one kernel
            fused = sdpa_with_lse(call.q, call.k, call.v, bias, sdpa_scale(call.scale, call.q.shape[-1]))
        if fused is not None:
            o, lse = fused
        elif call.backend is not None and bias is None and skip is None and not observed:
            o, on_backend = call.backend(call.q, call.k, call.v, sdpa_scale(call.scale, call.q.shape[-1])), True
        else:
            o = _sdpa(call, bias, skip)
    if call.backend is not None and not on_backend:
        _say_native_once(call, chain)
    for block, observers in observed:
        p_block = block_probs(call.q, call.k, call.scale, bias, block, lse=lse)
        for control, heads in observers:
            call.heads = heads
            control.observe(call, p_block)
    for control, heads in chain:
        if control.implements("out"):
            call.heads = heads
            o = control.out(call, o)
    call.heads = None
    return o


_SAID: set[tuple[str, str]] = set()


def _say_native_once(call: AttentionCall, chain: Chain) -> None:
    """Log, once per backend and control, that a layer left the user's backend for native SDPA."""
    names = ", ".join(type(c).__name__ for c, _ in chain)
    key = (str(call.backend.name), names)
    if key not in _SAID:
        _SAID.add(key)
        logger.warning(
            "attnctrl: layers with %s run PyTorch's SDPA instead of the %s attention backend "
            "(they need a mask, skipped rows or probabilities that backend does not give)",
            names,
            call.backend.name,
        )


def active_chain(run: RunContext, layer_name: str) -> Chain:
    """The controls planned on `layer_name` that are active at the run's current step."""
    planned = run.plan.get(layer_name)
    if not planned:
        return []
    return [(c, h) for c, h in planned if c.attends(run)]
