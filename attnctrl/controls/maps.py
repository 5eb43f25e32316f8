"""`AttentionMaps`: per-token cross-attention heatmaps, aggregated as they stream in.

DAAM-style aggregation (Tang et al., ACL 2023): for every selected layer and step, the
conditional branch's image→text attention probabilities are averaged over heads and added to a
running sum per token grid, so memory is one (images × h·w × text tokens) tensor per resolution
whatever the number of steps and layers. For SD3/FLUX joint attention the image→text block of
the joint softmax is renormalised over the text tokens, so every map is a distribution over text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention_block import ProbsBlock, image_text_block
from ..control import Control
from ..maps import AttentionMapResult
from ..selectors import Selector, SelectorLike


class AttentionMaps(Control):
    """Collect per-token attention maps of the conditional branch.

    Args:
        layers: selector of the layers to read (default: every layer with an image→text part).
        resolutions: keep only layers whose token grid height is in this list (e.g. ``[16]``).
        steps: (start, stop) step range, ints or fractions (default: all steps).
    Result: ``out.maps``, an `AttentionMapResult`.
    """

    name = "maps"
    default_layers = "cross"
    result_key = "maps"

    def __init__(
        self,
        layers: SelectorLike | None = None,
        resolutions: int | Sequence[int] | None = None,
        steps=None,
    ):
        if resolutions is not None:
            res = "|".join(str(int(r)) for r in ([resolutions] if isinstance(resolutions, int) else resolutions))
            base = layers if layers is not None else self.default_layers
            base = [base] if isinstance(base, (str, Selector)) else list(base)
            layers = [f"{b},res={res}" for b in base]
        super().__init__(layers=layers, steps=steps)
        self.resolutions = resolutions

    def begin(self, run) -> None:
        run.store[self] = {}

    def reads(self, call) -> ProbsBlock | None:
        """The conditional rows' image→text block, head-averaged; latent-optimisation passes (with
        gradients) are not part of the record."""
        return image_text_block(call, tuple(sorted(call.heads)) if call.heads is not None else None)

    def observe(self, call, m: torch.Tensor) -> None:
        if call.q_text is not None:  # joint attention: renormalise the image→text block over text
            m = m / m.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        acc = call.run.store[self]
        entry = acc.get(call.grid)
        if entry is None:
            acc[call.grid] = [m.clone(), 1]
        else:
            entry[0].add_(m)
            entry[1] += 1

    def result(self, run) -> AttentionMapResult:
        means = {}
        for (h, w), (total, count) in run.store.get(self, {}).items():
            means[(h, w)] = (total / count).reshape(total.shape[0], h, w, total.shape[-1]).permute(0, 3, 1, 2).cpu()
        return AttentionMapResult(means, prompts=list(run.prompts), text=run.text, family=run.family)

    def end(self, run) -> None:
        run.store.pop(self, None)
