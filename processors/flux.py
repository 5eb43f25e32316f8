"""Processor for FLUX attention (`FluxAttnProcessor`): double-stream blocks attend over
``[text, image]`` with separate projections; single-stream blocks get the concatenated
``[text, image]`` sequence as one input, so the text length comes from the run context.
RoPE is applied to q and k as the model does before the controls see them; the rotary
embedding is kept in ``call.extras["rope"]`` for controls that re-position keys.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from attnctrl.attention import AttentionCall, active_chain, attend, layer_scale
from attnctrl.layers import LayerInfo
from attnctrl.state import RunContext

from .backend import user_backend


class FluxAttnProcessor:
    """Controlled replacement of one FLUX attention layer's processor."""

    def __init__(self, original, layer: LayerInfo, run: RunContext):
        self.original = original
        self.layer = layer
        self.run = run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        chain = active_chain(self.run, self.layer.name)
        if not chain:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        if getattr(attn, "fused_projections", False):
            raise RuntimeError("attnctrl does not support fused QKV projections on FLUX; call unfuse_qkv_projections()")
        query = attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))
        key = attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        query, key = attn.norm_q(query), attn.norm_k(key)

        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            n_txt = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        else:
            n_txt = self.run.text_len or 0
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        total = query.shape[1]
        text, image = slice(0, n_txt), slice(n_txt, total)
        call = AttentionCall(
            layer=self.layer,
            run=self.run,
            q=query.transpose(1, 2),
            k=key.transpose(1, 2),
            v=value.transpose(1, 2),
            q_image=image,
            k_image=image,
            q_text=text if n_txt else None,
            k_text=text if n_txt else None,
            grid=self.run.grid,
            scale=layer_scale(attn),
            mask=attention_mask,
            module=attn,
            extras={"rope": image_rotary_emb},
            backend=user_backend(self.original),
        )
        out = attend(call, chain)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if double:
            encoder_hidden_states, hidden_states = hidden_states[:, :n_txt], hidden_states[:, n_txt:]
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states
