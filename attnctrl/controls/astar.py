"""`AStar`: A-STAR attention segregation and retention (Agarwal et al., ICCV 2023)."""
from __future__ import annotations

import torch

from attnctrl.control import Control
from attnctrl.losses import binarize, retention_loss, segregation_loss
from attnctrl.state import StepState

from .attention_loss import AttentionLossControl, as_list, parse_thresholds


class AStar(AttentionLossControl):
    """Keep subjects apart and keep what they have claimed, by test-time latent updates.

    There is no public code; this is our reading of the paper. On the subjects' 16×16 maps
    (preprocessed as in Attend-and-Excite: softmax over the text tokens ×100, smoothing):

    * **segregation** (§3.1): for every pair of subjects, the overlap
      ``Σ min(A_m, A_n) / Σ (A_m + A_n)`` (0 for disjoint maps, 0.5 for identical ones),
      averaged over pairs; applied over `steps` (first half, as A&E's updates);
    * **retention** (§3.2): each subject's map at step t should cover the region it held at
      step t−1: the previous step's map is binarised at `threshold` × its peak and compared with
      the current map (scaled to peak 1) by ``1 − soft-IoU``; applied over `retention_steps`
      (the whole trajectory by default), from the second step on.

    ``L = segregation·L_seg + retention·L_ret``, minimised with the A&E step schedule
    ``α_i = 20·sqrt(linspace(1, 0.5, T))``. Both weights 0 (or no tokens) ⇒ stock output.

    Args:
        tokens: subject words of the prompt (``["car", "sheep"]``) or token indices.
        segregation: weight of the segregation loss (1.0).
        retention: weight of the retention loss (1.0).
        threshold: binarisation threshold of the previous step's maps, relative to each map's peak (0.5).
        retention_steps: steps where retention applies ((0, 1.0): the whole trajectory).
        steps: steps where segregation applies ((0, 0.5)).
        refinement: optional refinement step → loss target, ``"0:0.3,10:0.2"`` (none by default).
        max_refinement: refinement iterations at most (20).
        scale_factor: step size scale α (20).
        scale_range: α_i = scale_factor·sqrt(linspace(start, end, T)[i]) ((1.0, 0.5)).
        resolution: token-grid height of the maps (default: latent grid / 4).
        layers: cross-attention layers to read (narrowed to `resolution`).
    """

    name = "astar"

    def __init__(
        self,
        tokens: list[str] | None = None,
        segregation: float = 1.0,
        retention: float = 1.0,
        threshold: float = 0.5,
        retention_steps: tuple[float, float] | None = (0.0, 1.0),
        steps: tuple[float, float] | None = (0.0, 0.5),
        refinement=None,
        max_refinement: int = 20,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        resolution: int | None = None,
        layers=None,
    ):
        if segregation < 0 or retention < 0:
            raise ValueError("segregation and retention weights must be >= 0")
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.tokens = as_list(tokens, "tokens")
        self.segregation, self.retention, self.threshold = float(segregation), float(retention), float(threshold)
        self.retention_steps = retention_steps
        super().__init__(
            resolution=resolution, steps=steps, scale_factor=scale_factor, scale_range=scale_range,
            refinement=parse_thresholds(refinement, {}), max_refinement=max_refinement, layers=layers,
        )

    def subject_specs(self) -> list:
        return self.tokens

    def enabled(self) -> bool:
        return bool(self.tokens) and (self.segregation > 0 or self.retention > 0)

    def _segregating(self, state) -> bool:
        return self.segregation > 0 and len(self.tokens) > 1 and Control.active(self, state)

    def _retaining(self, state) -> bool:
        if self.retention <= 0 or state.index == 0:
            return False
        return Control.active(_Window(self.retention_steps), state)

    def wants_update(self, state) -> bool:
        return self._segregating(state) or self._retaining(state)

    def measures(self, state) -> bool:
        nxt = StepState(state.index + 1, state.timestep, state.num_steps)
        return nxt.index < state.num_steps and self._retaining(nxt)

    def image_loss(self, maps: torch.Tensor, image: int, state) -> torch.Tensor:
        loss = maps.sum() * 0.0
        if self._segregating(state):
            loss = loss + self.segregation * segregation_loss(maps)
        previous = self.previous_maps(image)
        if previous is not None and self._retaining(state):
            loss = loss + self.retention * retention_loss(maps, binarize(previous, self.threshold))
        return loss


class _Window(Control):
    """A step range on its own, to reuse `Control.active` for a second window."""

    def __init__(self, steps):
        self.steps = steps
