"""The attention layers of a denoiser, described once: name, kind, place, block, scale, heads.

Layer names are diffusers' module paths (the keys of ``denoiser.attn_processors`` without
``.processor``), e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` or
``single_transformer_blocks.3.attn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch.nn as nn

KINDS = ("self", "cross", "joint")
#: The order a forward pass runs the places in: down, mid, up (UNet); double, then single blocks (DiT).
PLACE_ORDER = {"down": 0, "mid": 1, "up": 2, "blocks": 3, "single": 4}


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer.

    kind:   "self" (image→image), "cross" (image→text, UNet attn2) or "joint" (SD3/FLUX: one
            attention over image and text tokens; it contains both a self and a cross part).
    place:  "down" / "mid" / "up" for UNets; "blocks" (SD3 and FLUX double-stream blocks) or
            "single" (FLUX single-stream blocks) for transformers.
    block:  index of the block within its place (``down_blocks.2`` → 2; ``transformer_blocks.7`` → 7).
    factor: downsampling of this layer's token grid relative to the denoiser's input grid.
    heads:  number of attention heads.
    """

    name: str
    kind: str
    place: str
    block: int
    factor: int
    heads: int

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))

    def grid(self, input_grid: tuple[int, int]) -> tuple[int, int]:
        """Token grid (h, w) of this layer when the denoiser's input grid is `input_grid`."""
        h, w = input_grid
        return (h // self.factor, w // self.factor)

    def resolution(self, input_grid: tuple[int, int]) -> int:
        """Height of the layer's token grid (its side for square images)."""
        return self.grid(input_grid)[0]

    def has_part(self, part: str) -> bool:
        """Whether the layer attends image→image ("self") or image→text ("cross")."""
        return self.kind == part or (self.kind == "joint" and part in ("self", "cross"))


def _module(denoiser: nn.Module, name: str) -> nn.Module:
    return denoiser.get_submodule(name)


# `nn.Module.__getattr__` types every attribute it is not told about as ``Tensor | Module``: the
# casts below name what diffusers' models and attention modules actually hold there.
def _heads(attn: nn.Module) -> int:
    return cast(int, attn.heads)


def _unet_factors(unet: nn.Module) -> dict[str, int]:
    """Downsampling factor of every UNet block prefix, following the down/up samplers in order."""
    factors: dict[str, int] = {}
    f = 1
    for i, block in enumerate(cast(nn.ModuleList, unet.down_blocks)):
        factors[f"down_blocks.{i}"] = f
        if getattr(block, "downsamplers", None):
            f *= 2
    factors["mid_block"] = f
    for i, block in enumerate(cast(nn.ModuleList, unet.up_blocks)):
        factors[f"up_blocks.{i}"] = f
        if getattr(block, "upsamplers", None):
            f //= 2
    return factors


def _unet_layer(unet: nn.Module, name: str, factors: dict[str, int]) -> LayerInfo:
    seg = name.split(".")
    if seg[0] == "mid_block":
        place, block, prefix = "mid", 0, "mid_block"
    else:
        place, block = seg[0].split("_")[0], int(seg[1])
        prefix = f"{seg[0]}.{seg[1]}"
    attn = _module(unet, name)
    cross = bool(getattr(attn, "is_cross_attention", seg[-1] == "attn2"))
    return LayerInfo(name, "cross" if cross else "self", place, block, factors[prefix], _heads(attn))


def _transformer_layer(model: nn.Module, name: str) -> LayerInfo:
    seg = name.split(".")
    attn = _module(model, name)
    place = "single" if seg[0] == "single_transformer_blocks" else "blocks"
    # SD3.5 dual-attention blocks have a second, image-only self-attention `attn2`;
    # FLUX single blocks attend over the concatenated [text, image] sequence (joint).
    kind = "self" if seg[-1] == "attn2" else "joint"
    return LayerInfo(name, kind, place, int(seg[1]), 1, _heads(attn))


def list_layers(denoiser: nn.Module) -> list[LayerInfo]:
    """All attention layers of a UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel."""
    processors = cast("dict[str, object]", denoiser.attn_processors)  # a diffusers property
    names = [k[: -len(".processor")] for k in processors]
    if hasattr(denoiser, "down_blocks"):
        factors = _unet_factors(denoiser)
        return [_unet_layer(denoiser, n, factors) for n in names]
    if hasattr(denoiser, "transformer_blocks"):
        return [_transformer_layer(denoiser, n) for n in names]
    raise TypeError(f"unsupported denoiser {type(denoiser).__name__}: expected a UNet or an SD3/FLUX transformer")


def forward_order(layers: list) -> list:
    """Layers (`LayerInfo`, or anything with ``.place``) in the order a forward pass runs them.

    ``attn_processors`` lists a UNet's mid block last; this puts it between down and up. The sort is
    stable, so the order within a place (block by block) is kept."""
    return sorted(layers, key=lambda layer: PLACE_ORDER.get(layer.place, len(PLACE_ORDER)))
