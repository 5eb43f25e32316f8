"""`Conform`: CONFORM, contrast is all you need (Meral et al., CVPR 2024)."""
from __future__ import annotations

from typing import Any

import torch

from attnctrl.losses import nt_xent_loss

from .attention_loss import AttentionLossControl

#: the reference's refinement steps; each refines a fixed 20 iterations
CONFORM_REFINEMENT = (0, 10, 20)


def parse_groups(groups: Any) -> list[list]:
    """Groups as lists of token specs, from a list of lists or ``"green glasses;yellow clock"``."""
    if groups is None:
        return []
    if isinstance(groups, str):
        groups = [g.split() for g in groups.split(";") if g.strip()]
    out = []
    for g in groups:
        items = g.split() if isinstance(g, str) else list(g) if isinstance(g, (list, tuple)) else [g]
        if not items:
            raise ValueError("a group is empty; give at least one word per group")
        out.append(items)
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

    Tokens of one group (an object and its attributes, e.g. ``["green", "glasses"]``) are
    positives of each other, tokens of other groups negatives; each token's map from the previous
    step is added as an extra positive of its group. Maps are preprocessed as in Attend-and-Excite
    (softmax over the text tokens ×100, smoothing) and flattened; the loss is NT-Xent with cosine
    similarity and temperature τ (paper Eq. 3–4), minimised with the A&E step schedule over the
    first half of the steps and refined 20 iterations at steps 0, 10, 20 (reference defaults).

    Args:
        groups: token groups, lists of prompt words (``[["green", "glasses"], ["yellow", "clock"]]``;
            ``"green glasses;yellow clock"`` on the command line).
        temperature: NT-Xent temperature τ (0.5).
        previous: add the previous step's maps as extra positives (True).
        refinement_steps: steps that refine `max_refinement` iterations ((0, 10, 20)).
        max_refinement: refinement iterations (20).
        scale_factor: step size scale α (20).
        scale_range: α_i = scale_factor·sqrt(linspace(start, end, T)[i]) ((1.0, 0.5)).
        resolution: token-grid height of the maps (default: latent grid / 4).
        steps: steps that take a latent update ((0, 0.5)).
        layers: cross-attention layers to read (narrowed to `resolution`).
    """

    name = "conform"

    def __init__(
        self,
        groups: list[list[str]] | str | None = None,
        temperature: float = 0.5,
        previous: bool = True,
        refinement_steps: list[int] = CONFORM_REFINEMENT,
        max_refinement: int = 20,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        resolution: int | None = None,
        steps: tuple[float, float] | None = (0.0, 0.5),
        layers=None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.groups = parse_groups(groups)
        self.temperature, self.previous = float(temperature), bool(previous)
        super().__init__(
            resolution=resolution, steps=steps, scale_factor=scale_factor, scale_range=scale_range,
            refinement={int(i): None for i in refinement_steps}, max_refinement=max_refinement, layers=layers,
        )
        self._labels = [n for n, g in enumerate(self.groups) for _ in g]

    def subject_specs(self) -> list:
        return [item for g in self.groups for item in g]

    def begin(self, run) -> None:
        super().begin(run)
        if self._run is None:
            return
        for subjects in self._run["subjects"]:
            owner: dict[int, int] = {}
            for idx, label in zip(subjects, self._labels):
                for i in idx:
                    if owner.setdefault(i, label) != label:
                        raise ValueError(f"Conform: token {i} belongs to groups {owner[i]} and {label}; groups must not overlap")

    def image_loss(self, maps: torch.Tensor, image: int, state) -> torch.Tensor:
        labels = list(self._labels)
        embeddings = [m.flatten() for m in maps]
        previous = self.previous_maps(image) if self.previous else None
        if previous is not None:
            embeddings += [m.flatten() for m in previous]
            labels += self._labels
        return nt_xent_loss(torch.stack(embeddings), torch.tensor(labels, device=maps.device), self.temperature)
