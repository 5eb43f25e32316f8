"""`AStar`: A-STAR attention segregation and retention (Agarwal et al., ICCV 2023)."""

from __future__ import annotations

from typing import Annotated

import torch

from attnctrl.control import Control
from attnctrl.losses import Reduction, RetentionForm, binarize, retention_loss, segregation_loss
from attnctrl.params import WORDS, Range
from attnctrl.state import StepState

from .attention_loss import AttentionLossControl, as_list, parse_thresholds


class AStar(AttentionLossControl):
    """Keep subjects apart and keep what they have claimed, by test-time latent updates.

    A-STAR (Agarwal et al., "A-STAR: Test-time Attention Segregation and Retention for
    Text-to-image Synthesis", ICCV 2023) has no public code; this implements the paper's
    equations as written. On the subjects' cross-attention maps (preprocessed as in
    Attend-and-Excite: softmax over the text tokens ×100, Gaussian smoothing):

    * **segregation** (§3.3, Eq. 2): ``L_seg = Σ_{m>n} Σ min(A_m, A_n) / Σ (A_m + A_n)``, summed
      over every pair of subjects (0 for disjoint maps, 0.5 per pair for identical ones);
    * **retention** (§3.4, Eq. 3): the previous step's map of each subject is binarised (``B``, at
      `threshold` × its peak: the paper gives no number) and the current map ``A`` is held to it:
      ``L_ret = Σ_m [1 − Σ min(A_m, B_m) / Σ (A_m + B_m)]``, summed over the subjects; from the
      second step on (the first has nothing to retain);
    * **total** (§3.5, Eq. 4): ``L = L_seg + L_ret``, here ``segregation·L_seg + retention·L_ret``
      (both weights 1 by default), and ``z_t ← z_t − α_t ∇L`` at **every** step ("the process
      repeats until the last step"), with the Attend-and-Excite step sizes
      ``α_t = 20·sqrt(linspace(1, 0.5, T))`` (the paper does not give α_t).

    ``B`` comes from the maps the previous step's loss was computed on (the paper's ``A_t`` at
    ``z_t``); a step without an update still measures its maps when the next step needs them.
    Both weights 0 (or no tokens) ⇒ the stock output.

    Variants: ``reduction="mean"`` averages over pairs / subjects instead of summing;
    ``retention_form="soft-iou"`` uses ``1 − soft-IoU(A/max A, B)`` instead of Eq. 3. Together
    with ``steps=(0, 0.5)`` they give attnctrl's earlier reading of the paper.

    Args:
        tokens: subject words of the prompt (``["car", "sheep"]``) or token indices.
        segregation: weight of the segregation loss (1.0).
        retention: weight of the retention loss (1.0).
        threshold: binarisation threshold of the previous step's maps, relative to each map's peak (0.5).
        reduction: ``"sum"`` over pairs / subjects as in Eq. 2–3, or ``"mean"``.
        retention_form: ``"paper"`` (Eq. 3) or ``"soft-iou"``.
        retention_steps: steps where retention applies ((0, 1.0): the whole trajectory).
        steps: steps where segregation applies ((0, 1.0): every step, as the paper).
        refinement: optional refinement step → loss target, ``"0:0.3,10:0.2"`` (none by default).
        max_refinement: refinement iterations at most (20).
        scale_factor: step size scale α (20).
        scale_range: α_i = scale_factor·sqrt(linspace(start, end, T)[i]) ((1.0, 0.5)).
        resolution: token-grid height of the maps (default: latent grid / 4).
        normalize_eot: renormalise over the prompt's tokens only (Attend-and-Excite's SD 2.x
            setting); None: on when the tokenizer pads with its own pad token (SD 2.x).
        layers: cross-attention layers to read (narrowed to `resolution`).
    """

    name = "astar"

    def __init__(
        self,
        tokens: Annotated[list[str] | None, WORDS] = None,
        segregation: Annotated[float, Range(0)] = 1.0,
        retention: Annotated[float, Range(0)] = 1.0,
        threshold: Annotated[float, Range(0, 1, lo_open=True)] = 0.5,
        reduction: Reduction = "sum",
        retention_form: RetentionForm = "paper",
        retention_steps: tuple[float, float] | None = (0.0, 1.0),
        steps: tuple[float, float] | None = (0.0, 1.0),
        refinement=None,
        max_refinement: Annotated[int, Range(0)] = 20,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        resolution: Annotated[int | None, Range(1)] = None,
        normalize_eot: bool | None = None,
        layers=None,
    ):
        self.tokens = as_list(tokens, "tokens")
        self.segregation, self.retention, self.threshold = float(segregation), float(retention), float(threshold)
        self.reduction, self.retention_form = reduction, retention_form
        self.retention_steps = retention_steps
        super().__init__(
            resolution=resolution,
            steps=steps,
            scale_factor=scale_factor,
            scale_range=scale_range,
            refinement=parse_thresholds(refinement, {}),
            max_refinement=max_refinement,
            normalize_eot=normalize_eot,
            layers=layers,
        )

    def subject_specs(self) -> list:
        return self.tokens

    def enabled(self) -> bool:
        return bool(self.tokens) and (self.segregation > 0 or self.retention > 0)

    def _segregating(self, state) -> bool:
        return self.segregation > 0 and len(self.tokens) > 1 and self.active(state)

    def _retaining(self, state) -> bool:
        if self.retention <= 0 or state.index == 0:
            return False
        return _Window(self.retention_steps).active(state)

    def wants_update(self, state) -> bool:
        return self._segregating(state) or self._retaining(state)

    def measures(self, state) -> bool:
        nxt = StepState(state.index + 1, state.timestep, state.num_steps)
        return nxt.index < state.num_steps and self._retaining(nxt)

    def image_loss(self, run, maps: torch.Tensor, image: int) -> torch.Tensor:
        state = run.state
        loss = maps.sum() * 0.0
        if self._segregating(state):
            loss = loss + self.segregation * segregation_loss(maps, self.reduction)
        previous = self.previous_maps(run, image)
        if previous is not None and self._retaining(state):
            masks = binarize(previous, self.threshold)
            loss = loss + self.retention * retention_loss(
                maps, masks, form=self.retention_form, reduction=self.reduction
            )
        return loss


class _Window(Control):
    """A step range on its own, to reuse `Control.active` for a second window."""

    def __init__(self, steps):
        self.steps = steps
