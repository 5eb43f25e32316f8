"""Test-time latent optimisation with the Attend-and-Excite schedule (Chefer et al., 2023, §3.3).

At step i the latents move against the gradient of an attention loss:
``z ← z − α_i ∇_z L(z)``, ``α_i = scale_factor · sqrt(linspace(scale_range)[i])`` (A&E: 20·sqrt(linspace(1, 0.5, T))).
At the refinement steps (A&E: {0: 0.05, 10: 0.5, 20: 0.8}) the update is first repeated, up to
`max_refinement` times, while the loss stays above the step's target; with targets of None the
update is repeated exactly `max_refinement` times (CONFORM's refinement at steps 0, 10, 20).

The refinement loop follows the reference's order of operations exactly: iteration k updates the
latents with the loss measured before the update and stops after an iteration whose measured
loss was already on target; the loss is then measured once more for the regular update.

Every image of the batch is optimised on its own loss: the losses are summed, which gives each
image's latents the gradient of its own loss (the denoiser treats rows independently), and
refinement continues only for the images still above target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]  # latents (B, ...) -> per-image losses (B,)


def _ae_thresholds() -> dict[int, float | None]:
    return {0: 0.05, 10: 0.5, 20: 0.8}


@dataclass
class LatentOptimizer:
    """Step sizes and refinement schedule of the latent updates.

    Args:
        scale_factor: α scale (A&E: 20).
        scale_range: (start, end) of the linspace under the square root (A&E: (1.0, 0.5)).
        refinement: step index → loss target for iterative refinement; None as a target means
            "iterate `max_refinement` times" (A&E: {0: 0.95, 10: 0.5, 20: 0.2} as loss targets).
        max_refinement: refinement iterations at most (A&E, CONFORM: 20).
    """

    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    refinement: Mapping[int, float | None] = field(default_factory=dict)
    max_refinement: int = 20

    def step_size(self, index: int, num_steps: int) -> float:
        """α_i = scale_factor · sqrt(linspace(start, end, T)[i])."""
        lo, hi = self.scale_range
        frac = 0.0 if num_steps <= 1 else index / (num_steps - 1)
        return float(self.scale_factor * (lo + (hi - lo) * frac) ** 0.5)

    def run(self, latents: torch.Tensor, index: int, num_steps: int, loss_fn: LossFn, update: bool) -> torch.Tensor:
        """Refine (if `index` is a refinement step) and update (if `update`) the latents; returns them detached."""
        refine = index in self.refinement
        if not (refine or update):
            return latents
        alpha = self.step_size(index, num_steps)
        with torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            loss = loss_fn(z)
            if refine:
                z, loss = self._refine(z, loss, loss_fn, alpha, self.refinement[index])
            if update:
                z = self._descend(z, loss, alpha)
        return z.detach()

    @staticmethod
    def _descend(z: torch.Tensor, loss: torch.Tensor, alpha: float, rows: torch.Tensor | None = None) -> torch.Tensor:
        if not loss.requires_grad:  # a loss that does not depend on the latents (e.g. nothing to compare yet)
            return z.detach()
        (grad,) = torch.autograd.grad(loss.sum(), z)
        if rows is not None:
            grad = grad * rows.view(-1, *([1] * (grad.dim() - 1))).to(grad)
        return z.detach() - alpha * grad

    def _refine(self, z, loss, loss_fn, alpha, target):
        with torch.no_grad():
            running = torch.ones_like(loss, dtype=torch.bool) if target is None else loss.detach() > target
        if not bool(running.any()):
            return z, loss
        for k in range(1, self.max_refinement + 1):
            measured = loss.detach()
            z = self._descend(z, loss, alpha, running).requires_grad_(True)
            if target is not None:
                running = running & (measured > target)
            if k >= self.max_refinement or not bool(running.any()):
                break
            loss = loss_fn(z)
        return z, loss_fn(z)
