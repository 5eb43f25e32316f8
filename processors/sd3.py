"""Processor for SD3 / SD3.5 joint attention (`JointAttnProcessor2_0`).

The joint layer attends over ``[image tokens, text tokens]``; QK-norm (SD3.5) is applied as the
model does, before the controls see q and k. SD3.5 dual-attention blocks have a second,
image-only layer `attn2` (kind "self"), called without text.
"""

from __future__ import annotations

import torch

from attnctrl.attention import AttentionCall, active_chain, attend, layer_scale
from attnctrl.layers import LayerInfo
from attnctrl.state import RunContext


def _heads(x, batch, heads, head_dim):
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


class SD3JointAttnProcessor:
    """Controlled replacement of one SD3 attention layer's processor."""

    def __init__(self, original, layer: LayerInfo, run: RunContext):
        self.original = original
        self.layer = layer
        self.run = run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        chain = active_chain(self.run, self.layer.name)
        if not chain:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)

        batch = hidden_states.shape[0]
        n_img = hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(t, batch, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_txt = 0
        if encoder_hidden_states is not None:
            n_txt = encoder_hidden_states.shape[1]
            eq = _heads(attn.add_q_proj(encoder_hidden_states), batch, attn.heads, head_dim)
            ek = _heads(attn.add_k_proj(encoder_hidden_states), batch, attn.heads, head_dim)
            ev = _heads(attn.add_v_proj(encoder_hidden_states), batch, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        text = slice(n_img, n_img + n_txt) if n_txt else None
        call = AttentionCall(
            layer=self.layer,
            run=self.run,
            q=query,
            k=key,
            v=value,
            q_image=slice(0, n_img),
            k_image=slice(0, n_img),
            q_text=text,
            k_text=text,
            grid=self.run.grid,
            scale=layer_scale(attn),
            mask=attention_mask,
            module=attn,
        )
        out = attend(call, chain)
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
