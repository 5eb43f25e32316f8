"""`Conform`: CONFORM, contrast is all you need (Meral et al., CVPR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import torch

from attnctrl.losses import nt_xent_loss
from attnctrl.params import GROUPS, Range
from attnctrl.tokens import parse_groups

from .attention_loss import AttentionLossControl

#: the reference's refinement steps (``iterative_refinement_steps``); each refines a fixed 20 iterations
CONFORM_REFINEMENT = (0, 10, 20)
#: steps with a latent update: indices below the notebook's ``max_iter_to_alter = 30``
CONFORM_STEPS = (0, 30)


def _groups(groups: Any) -> list[list]:
    """`attnctrl.tokens.parse_groups`, refusing groups that share a word or token index."""
    out = parse_groups(groups)
    seen: dict = {}
    for n, g in enumerate(out):
        for item in g:
            key = item.strip().lower() if isinstance(item, str) else item
            if key in seen and seen[key] != n:
                raise ValueError(f"{item!r} is in groups {seen[key]} and {n}; groups must not overlap")
            seen[key] = n
    return out


class Conform(AttentionLossControl):
    """Pull the maps of tokens that belong together, push apart those that don't (NT-Xent).

    CONFORM (Meral et al., "CONFORM: Contrast is All You Need For High-Fidelity Text-to-Image
    Diffusion Models", CVPR 2024), following the authors' ``pipeline_conform.py`` and the settings
    their ``notebook.ipynb`` runs with. Tokens of one group (an object and its attributes, e.g.
    ``["green", "glasses"]``) are positives of each other, tokens of other groups negatives; each
    token's map from the previous step is added as an extra positive of its group (the reference's
    ``add_previous_attention_maps``). Each map is preprocessed as the reference does, then
    flattened: optional softmax over the text tokens ×100 (`softmax_normalize`), Gaussian smoothing
    (`smoothing`, `kernel_size`, `sigma`), optional softmax ×100 over the map's pixels
    (`softmax_normalize_attention_maps`). The loss is NT-Xent with cosine similarity and
    temperature τ (paper Eq. 3–4; the reference calls ``pytorch_metric_learning``'s
    ``NTXentLoss``), minimised by ``z ← z − α_i ∇L`` with ``α_i = 20·sqrt(linspace(1, 0.5, T))[i]``
    at the steps before 30 (the notebook's ``max_iter_to_alter``), with 20 extra updates at steps
    0, 10 and 20 (``refinement_steps``, ``iterative_refinement_steps``).

    Defaults are the notebook's: ``softmax_normalize=False`` and updates before step 30. The
    pipeline's own signature defaults are ``softmax_normalize=True`` and 25 steps
    (``Conform(softmax_normalize=True, steps=(0, 25))``); with them the reference multiplies the
    stored previous-step maps by 100 in place at every loss evaluation, which overflows within a
    refinement step. attnctrl does not reproduce that.

    Args:
        groups: token groups, lists of prompt words (``[["green", "glasses"], ["yellow", "clock"]]``;
            ``"green glasses;yellow clock"`` on the command line).
        temperature: NT-Xent temperature τ (0.5).
        previous: add the previous step's maps as extra positives (True).
        softmax_normalize: softmax ×100 over the text tokens (without the first and last) first (False).
        softmax_normalize_attention_maps: softmax ×100 over each smoothed map's pixels (False).
        smoothing: Gaussian smoothing of each map (the reference's ``do_smoothing``; True).
        kernel_size: smoothing kernel size (``smoothing_kernel_size``; 3).
        sigma: smoothing σ (``smoothing_sigma``; 0.5).
        refinement_steps: steps that refine `max_refinement` iterations ((0, 10, 20)).
        max_refinement: refinement iterations (20).
        scale_factor: step size scale α (20).
        scale_range: α_i = scale_factor·sqrt(linspace(start, end, T)[i]) ((1.0, 0.5)).
        resolution: token-grid height of the maps (default: latent grid / 4).
        steps: steps that take a latent update ((0, 30): step indices 0..29, whatever T).
        normalize_eot: with `softmax_normalize`, renormalise over the prompt's tokens only
            (Attend-and-Excite's SD 2.x setting); None: on when the tokenizer pads with its own token.
        layers: cross-attention layers to read (narrowed to `resolution`).
    """

    name = "conform"

    def __init__(
        self,
        groups: Annotated[list[list[str]] | str | None, GROUPS] = None,
        temperature: Annotated[float, Range(0, lo_open=True)] = 0.5,
        previous: bool = True,
        softmax_normalize: bool = False,
        softmax_normalize_attention_maps: bool = False,
        smoothing: bool = True,
        kernel_size: int = 3,
        sigma: Annotated[float, Range(0, lo_open=True)] = 0.5,
        refinement_steps: Sequence[int] = CONFORM_REFINEMENT,
        max_refinement: Annotated[int, Range(0)] = 20,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        resolution: Annotated[int | None, Range(1)] = None,
        steps: tuple[float, float] | None = CONFORM_STEPS,
        normalize_eot: bool | None = None,
        layers=None,
    ):
        if smoothing and (int(kernel_size) < 1 or int(kernel_size) % 2 == 0):
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.groups = _groups(groups)
        self.temperature, self.previous = float(temperature), bool(previous)
        self.softmax_normalize = bool(softmax_normalize)
        self.softmax_normalize_attention_maps = bool(softmax_normalize_attention_maps)
        super().__init__(
            resolution=resolution,
            steps=steps,
            scale_factor=scale_factor,
            scale_range=scale_range,
            refinement={int(i): None for i in refinement_steps},
            max_refinement=max_refinement,
            softmax_scale=100.0 if self.softmax_normalize else None,
            smoothing=bool(smoothing),
            kernel_size=int(kernel_size),
            sigma=float(sigma),
            normalize_eot=normalize_eot,
            layers=layers,
        )
        self._labels = [n for n, g in enumerate(self.groups) for _ in g]

    def subject_specs(self) -> list:
        return [item for g in self.groups for item in g]

    def begin(self, run) -> None:
        super().begin(run)
        if run.store[self] is None:
            return
        for subjects in run.store[self]["subjects"]:
            owner: dict[int, int] = {}
            for idx, label in zip(subjects, self._labels):
                for i in idx:
                    if owner.setdefault(i, label) != label:
                        raise ValueError(
                            f"Conform: token {i} belongs to groups {owner[i]} and {label}; groups must not overlap"
                        )

    def subject_maps(self, run, maps: torch.Tensor, image: int) -> torch.Tensor:
        """The reference's per-token preprocessing; with `softmax_normalize_attention_maps`, each
        (smoothed) map is also renormalised over its pixels: ``softmax(100 · map)``."""
        subj = super().subject_maps(run, maps, image)
        if not self.softmax_normalize_attention_maps:
            return subj
        return (subj.flatten(1) * 100.0).softmax(dim=-1).view_as(subj)

    def image_loss(self, run, maps: torch.Tensor, image: int) -> torch.Tensor:
        labels = list(self._labels)
        embeddings = [m.flatten() for m in maps]
        previous = self.previous_maps(run, image) if self.previous else None
        if previous is not None:
            embeddings += [m.flatten() for m in previous]
            labels += self._labels  # the previous maps are positives of their own group
        return nt_xent_loss(torch.stack(embeddings), torch.tensor(labels, device=maps.device), self.temperature)
