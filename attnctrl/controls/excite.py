"""`AttendExcite`: Attend-and-Excite (Chefer et al., SIGGRAPH 2023)."""

from __future__ import annotations

from typing import Annotated

import torch

from attnctrl.losses import excite_loss
from attnctrl.params import WORDS, Range

from .attention_loss import AttentionLossControl, as_list, parse_thresholds

#: the reference's refinement thresholds on the subjects' peak attention, by step index
AE_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}


class AttendExcite(AttentionLossControl):
    """Strengthen neglected subjects: move the latents so every subject token's attention peaks.

    Loss (paper Eq. 2): ``L = max_s (1 − max A_s)`` on 16×16 cross-attention maps (softmax over
    the text tokens ×100 without BOS/EOS, Gaussian-smoothed), minimised by ``z ← z − α_i ∇L``
    with ``α_i = 20·sqrt(linspace(1, 0.5, T))`` over steps 0–24 (``max_iter_to_alter=25``); at steps
    0, 10 and 20 the update repeats (≤ 20 times) until every subject peaks above 0.05, 0.5, 0.8.
    Reproduces diffusers' ``StableDiffusionAttendAndExcitePipeline``.

    Args:
        tokens: subject words of the prompt (``["cat", "frog"]``, ``"dog#2"``) or token indices.
        thresholds: refinement step → peak attention to reach ({0: 0.05, 10: 0.5, 20: 0.8};
            ``"0:0.05,10:0.5"`` on the command line; empty: no refinement).
        max_refinement: refinement iterations at most per refinement step (20).
        scale_factor: step size scale α (20).
        scale_range: α_i = scale_factor·sqrt(linspace(start, end, T)[i]) ((1.0, 0.5)).
        resolution: token-grid height of the maps (default: latent grid / 4, i.e. 16 for SD at 512 px).
        steps: steps that take a latent update ((0, 25): absolute step indices 0–24, as the
            reference's ``max_iter_to_alter=25``; the first half of a 50-step run).
        smoothing: Gaussian smoothing of the maps (kernel 3, σ 0.5) before the loss.
        normalize_eot: renormalise over the prompt's tokens only (the reference's SD 2.x setting);
            None: on when the tokenizer pads with its own pad token (SD 2.x).
        layers: cross-attention layers to read (narrowed to `resolution`).
    """

    name = "attend-excite"

    def __init__(
        self,
        tokens: Annotated[list[str] | None, WORDS] = None,
        thresholds=None,
        max_refinement: Annotated[int, Range(0)] = 20,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        resolution: Annotated[int | None, Range(1)] = None,
        steps: tuple[float, float] | None = (0, 25),
        smoothing: bool = True,
        normalize_eot: bool | None = None,
        layers=None,
    ):
        self.tokens = as_list(tokens, "tokens")
        self.thresholds = parse_thresholds(thresholds, AE_THRESHOLDS)
        targets = {k: max(0.0, 1.0 - v) for k, v in self.thresholds.items()}
        super().__init__(
            resolution=resolution,
            steps=steps,
            scale_factor=scale_factor,
            scale_range=scale_range,
            refinement=targets,
            max_refinement=max_refinement,
            smoothing=smoothing,
            normalize_eot=normalize_eot,
            layers=layers,
        )

    def subject_specs(self) -> list:
        return self.tokens

    def image_loss(self, run, maps: torch.Tensor, image: int) -> torch.Tensor:
        return excite_loss(maps)
