"""Processor for diffusers' UNet `Attention` (SD 1.x/2.x, SDXL): self (attn1) and cross (attn2).

With no active control on the layer it calls the processor it replaced, unchanged; otherwise it
reproduces `AttnProcessor2_0` around `attnctrl.attention.attend`.
"""

from __future__ import annotations

import math

from attnctrl.attention import AttentionCall, active_chain, attend, layer_scale
from attnctrl.layers import LayerInfo
from attnctrl.state import RunContext


class UNetAttnProcessor:
    """Controlled replacement of one UNet attention layer's processor."""

    def __init__(self, original, layer: LayerInfo, run: RunContext):
        self.original = original
        self.layer = layer
        self.run = run

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        chain = active_chain(self.run, self.layer.name)
        if not chain:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        n_img = query.shape[2]
        grid = _grid(n_img, self.run.grid, self.layer.factor)
        call = AttentionCall(
            layer=self.layer,
            run=self.run,
            q=query,
            k=key,
            v=value,
            q_image=slice(0, n_img),
            k_image=slice(0, 0) if is_cross else slice(0, key.shape[2]),
            k_text=slice(0, key.shape[2]) if is_cross else None,
            grid=grid,
            scale=layer_scale(attn),
            mask=attention_mask,
            module=attn,
        )
        out = attend(call, chain)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _grid(n_tokens: int, input_grid: tuple[int, int], factor: int) -> tuple[int, int]:
    """(h, w) of a layer's `n_tokens` image tokens, from the run's input grid and the layer factor."""
    h, w = input_grid[0] // factor, input_grid[1] // factor
    if h * w == n_tokens:
        return h, w
    # odd sizes round differently through the UNet's convolutions: fall back to the aspect ratio
    ratio = input_grid[1] / input_grid[0]
    h = max(1, round(math.sqrt(n_tokens / ratio)))
    return h, n_tokens // h


__all__ = ["UNetAttnProcessor"]
