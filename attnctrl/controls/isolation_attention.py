"""The per-row attention of `IsolationReposition` (IR-Diffusion, arXiv 2411.19261): shared keys, dropout, mutual cross."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import sdpa_scale
from ..rope import rerotate
from .isolation_regions import NEG, target_cells


def move_rope(k: torch.Tensor, rope, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Keys k (B, H, N, D) rotated for sequence positions `src` (B, N), re-rotated for positions `dst`."""
    cos, sin = rope
    return rerotate(k, (cos[src][:, None], sin[src][:, None]), (cos[dst][:, None], sin[dst][:, None]))


def dropout_keep(seed: int, step: int, grid: tuple[int, int], subjects: int, p: float) -> torch.Tensor:
    """Bool (subjects, h·w): the cells each subject's region keeps at `step` on `grid` (each with probability 1 − p).

    Drawn from a CPU ``torch.Generator`` seeded with a fixed function of (seed, step, grid), so the same
    arguments always give the same cells, whatever else the run draws."""
    h, w = grid
    mixed = ((int(seed) * 1_000_003 + int(step)) * 1_000_033 + h * 65_537 + w) % (2**63 - 1)
    g = torch.Generator().manual_seed(mixed)
    return torch.bernoulli(torch.full((subjects, h * w), 1.0 - p), generator=g).bool()


def rows_of(mask: torch.Tensor | None, rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The model's own mask for batch `rows` (it may broadcast over the batch)."""
    if mask is None:
        return None
    return mask[rows] if mask.dim() == 4 and mask.shape[0] == batch else mask


def dropout_cells(ctrl, call, st) -> torch.Tensor:
    """Bool (subjects, Lq): the query cells this step's dropout keeps (per step and grid, cached)."""
    state = call.run.state
    step = state.index if state is not None else 0
    key = (step, call.grid, call.q.shape[2], call.q_image.start, call.q.device)
    got = st["keep"].get(key)
    if got is None:
        if any(k[0] != step for k in st["keep"]):
            st["keep"] = {}
        h, w = call.grid
        keep = torch.zeros(len(ctrl.subjects), call.q.shape[2], dtype=torch.bool)
        keep[:, call.q_image.start : call.q_image.start + h * w] = dropout_keep(
            ctrl.seed, step, call.grid, len(ctrl.subjects), ctrl.dropout
        )
        got = st["keep"][key] = keep.to(call.q.device)
    return got


def target_bias(ctrl, call, st, plan) -> torch.Tensor:
    """(T, 1, Lq, Lk + extra) additive mask of the target rows at this step (built once per step)."""
    state = call.run.state
    step = (state.index if state is not None else 0) if ctrl.dropout > 0 and plan["extra"] else -1
    if plan["step"] == step:
        return plan["bias"]
    T, subjects = plan["region"].shape[:2]
    Lq, Lk, n = call.q.shape[2], plan["Lk"], plan["extra"]
    own = plan["own"] if plan["own"] is not None else call.q.new_zeros(T, 1, Lq, Lk)
    if not n:
        bias = own
    else:
        allow = plan["region"]
        if ctrl.dropout > 0:
            thinned = allow & dropout_cells(ctrl, call, st)[None]
            allow = torch.where(thinned.any(-1, keepdim=True), thinned, allow)  # a region never vanishes
        allow = torch.cat([allow, allow.new_zeros(T, 1, Lq)], dim=1).transpose(1, 2)  # (T, Lq, subjects + 1)
        ok = allow.gather(2, plan["key_subject"][:, None, :].expand(T, Lq, n))
        extra = torch.zeros(T, 1, Lq, n, dtype=own.dtype, device=own.device).masked_fill_(~ok[:, None], NEG)
        bias = torch.cat([own, extra], dim=-1)
    plan["step"], plan["bias"] = step, bias
    return bias


def shared_kv(call, plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values (T, H, extra, D) the target rows read from their references (RoPE moved on FLUX)."""
    ki = call.k_image
    k_sh = call.k[:, :, ki][plan["src_rows"], :, plan["src"]].permute(0, 2, 1, 3)
    v_sh = call.v[:, :, ki][plan["src_rows"], :, plan["src"]].permute(0, 2, 1, 3)
    rope = call.extras.get("rope")
    if plan["moved"] and rope is not None:
        k_sh = move_rope(k_sh, rope, plan["src"] + ki.start, plan["dst"] + ki.start)
    return k_sh.to(call.k.dtype), v_sh.to(call.v.dtype)


def joint_kv(call, plan, bias_t) -> torch.Tensor:
    """One SDPA for all rows: the shared keys/values appended to every row, −∞ for the non-target rows;
    returns the additive mask of all rows."""
    B, n, t = call.batch, plan["extra"], plan["targets"]
    if plan.get("joint_of") is not bias_t:  # built once per target mask (once per step with dropout)
        bias = call.q.new_zeros(B, 1, call.q.shape[2], plan["Lk"] + n)
        if n:
            bias[:, :, :, plan["Lk"] :] = NEG
        bias[t] = bias_t
        plan["joint_of"], plan["joint"] = bias_t, bias
    if not n:
        return plan["joint"]
    k_t, v_t = shared_kv(call, plan)
    k_sh = call.k.new_zeros(B, call.k.shape[1], n, call.k.shape[3])
    v_sh = call.v.new_zeros(B, call.v.shape[1], n, call.v.shape[3])
    k_sh[t], v_sh[t] = k_t, v_t
    call.k = torch.cat([call.k, k_sh], dim=2)
    call.v = torch.cat([call.v, v_sh], dim=2)
    if call.mask is not None:  # the model's own mask does not know the extra keys: they stay open
        pad = call.mask.new_zeros(call.mask.shape[:-1] + (n,))
        call.mask = torch.cat([call.mask.expand(*call.mask.shape[:-1], call.mask.shape[-1]), pad], dim=-1)
    return plan["joint"]


def own_rows(call, ex, o: torch.Tensor) -> torch.Tensor:
    """All rows computed here: reference rows as the stock SDPA call, target rows with the shared keys and the mask."""
    if torch.is_grad_enabled():
        o = o.clone()  # keep autograd's saved tensors intact
    plan = ex["plan"]
    scale = sdpa_scale(call.scale, call.q.shape[-1])  # as the layer's own SDPA call
    B = call.batch
    r = plan["others"]
    if ex["skipped"] and len(r):  # the stock SDPA call on the reference rows: own keys, no added mask
        o[r] = F.scaled_dot_product_attention(
            call.q[r], call.k[r], call.v[r], attn_mask=rows_of(call.mask, r, B), dropout_p=0.0, scale=scale
        )
    t, n = plan["targets"], plan["extra"]
    k, v, bias = call.k[t], call.v[t], ex["bias"]
    if n:
        k_sh, v_sh = shared_kv(call, plan)
        k, v = torch.cat([k, k_sh], dim=2), torch.cat([v, v_sh], dim=2)
    mask = rows_of(call.mask, t, B)
    if mask is not None:
        mask = F.pad(mask.expand(*mask.shape[:-1], call.k.shape[2]), (0, n))
        bias = bias + mask
    o[t] = F.scaled_dot_product_attention(call.q[t], k, v, attn_mask=bias.to(call.q.dtype), dropout_p=0.0, scale=scale)
    return o


def mutual_plan(ctrl, call, st):
    """(target rows (T,), their references' rows (T, subjects), weights m_i/Σm (T, subjects, 1, Lq, 1),
    Σm > 0 (T, 1, Lq, 1)) for a cross-attention layer shape (cached), or False."""
    run, layout = call.run, call.run.layout
    auto = ctrl.regions(run) if ctrl._reads else None
    key = (
        call.grid,
        call.q.shape[2],
        layout.branches,
        layout.images,
        auto is not None,
        call.q.dtype,
        call.q.device,
    )
    got = st["mutual"].get(key)
    if got is not None:
        return got
    h, w = call.grid
    subjects, Lq, qi = len(ctrl.subjects), call.q.shape[2], call.q_image
    tgt, refs, weights = [], [], []
    for b in layout.branches:
        start = layout.rows(b).start
        for t in st["targets"]:
            cells = target_cells(st, call.grid, t, auto)
            if cells is None:
                continue
            m = torch.zeros(subjects, Lq)
            m[:, qi.start : qi.start + h * w] = cells.reshape(subjects, h * w).float()
            tgt.append(start + t)
            refs.append([start + r for r in ctrl.references])
            weights.append(m)
    if not tgt:
        st["mutual"][key] = False
        return False
    m = torch.stack(weights)  # (T, subjects, Lq)
    total = m.sum(1, keepdim=True)
    dev, dt = call.q.device, call.q.dtype
    got = (
        torch.tensor(tgt, device=dev),
        torch.tensor(refs, device=dev),
        (m / total.clamp_min(1.0))[:, :, None, :, None].to(device=dev, dtype=dt),
        (total > 0)[:, :, :, None].to(dev),
    )
    st["mutual"][key] = got
    return got


def mutual_out(ctrl, call, o: torch.Tensor) -> torch.Tensor:
    """Target rows: ``(1 − λ)·O_t + λ·Σ_i m_i·softmax(Q_t K_iᵀ/√d)V_i / Σ_i m_i`` inside the regions."""
    plan = mutual_plan(ctrl, call, call.run.store[ctrl])
    if not plan:
        return o
    t, refs, weight, inside = plan
    T, S = refs.shape
    q = call.q[t]
    q = q[:, None].expand(T, S, *q.shape[1:]).reshape(T * S, *q.shape[1:])
    r = refs.flatten()
    scale = sdpa_scale(call.scale, call.q.shape[-1])
    o_ref = F.scaled_dot_product_attention(
        q, call.k[r], call.v[r], attn_mask=rows_of(call.mask, r, call.batch), dropout_p=0.0, scale=scale
    )
    mixed = (o_ref.view(T, S, *o_ref.shape[1:]) * weight).sum(1)
    if torch.is_grad_enabled():
        o = o.clone()
    lam = ctrl.mutual_cross
    o_t = o[t]
    o[t] = torch.where(inside, o_t * (1.0 - lam) + mixed * lam, o_t)
    return o
