"""Panoramas: MultiDiffusion (Bar-Tal et al. 2023) and MAD, Merge-Attend-Diffuse (Quattrini et al. 2024).

``pipe(prompt, height=512, width=2048, controls=[ac.Panorama()])`` denoises views of the wide
latent canvas and merges their guided predictions at every step (MultiDiffusion, Eq. 5: per
latent pixel, the uniform average of the views containing it; for the affine samplers this is
the average of the views' stepped latents that the reference code takes). The loop that does this
is `attnctrl.pipelines.panorama`; this control is its configuration and, for ``method="mad"``,
MAD's attention operator (§3.2, `attnctrl.panorama.merged_attention`): on self-attention layers
the views' q, k, v are merged into the canvas and attend over all of it until the switch step
(the paper's 25 of 50: ``switch=0.5``), per view after; cross-attention merges the views' queries
at every step.

Composes with PAG / HeadPerturbation (per view: their perturbed branch is a branch of every view),
AttentionMaps (the views' maps merged into maps of the whole panorama) and, with
``method="multidiffusion"``, SharedAttention across a batch of panoramas (views then go
one per denoiser call, so view i of every panorama shares view i of the reference); the pipeline
refuses every other control with an error naming it. SD 1.x/2.x and SDXL (UNet) only.
"""

from __future__ import annotations

from typing import Annotated, Literal

from ..attention import sdpa_scale
from ..control import Control
from ..panorama import Views, merged_attention, merged_cross_attention
from ..params import Range

__all__ = ["Panorama"]


class Panorama(Control):
    """A wide canvas denoised as overlapping views, merged every step.

    Args:
        method: ``"mad"`` (merged attention, then MultiDiffusion's merge) or ``"multidiffusion"``.
        view: view side in latents (default: the denoiser's native size, 64 for SD, 128 for SDXL,
            as both papers); clipped to the canvas.
        stride: latents between views (default 16, the papers'; ``view // 4`` for views under 64).
        circular: a 360° panorama: the views wrap around the width (which stride must divide).
        switch: fraction of the steps with MAD's merged self-attention (25 of 50 in the paper).
        chunk: queries per merged self-attention block (memory: see `attnctrl.panorama`).
        view_batch: views per denoiser call for MultiDiffusion (default all; MAD needs all).
    """

    name = "panorama"
    default_layers = ("self", "cross")

    def __init__(
        self,
        method: Literal["mad", "multidiffusion"] = "mad",
        view: Annotated[int, Range(1)] | None = None,
        stride: Annotated[int, Range(1)] | None = None,
        circular: bool = False,
        switch: Annotated[float, Range(0, 1)] = 0.5,
        chunk: Annotated[int, Range(1)] = 4096,
        view_batch: Annotated[int, Range(1)] | None = None,
        layers=None,
    ):
        super().__init__(layers=layers)
        if method == "mad" and view_batch is not None:
            raise ValueError("method='mad' merges all views in one denoiser call; view_batch is for multidiffusion")
        self.method, self.view, self.stride, self.circular = method, view, stride, circular
        self.switch, self.chunk, self.view_batch = float(switch), int(chunk), view_batch

    @property
    def effects(self) -> frozenset[str]:  # type: ignore[override]
        # MAD attends over the merged canvas's keys/values instead of the view's own
        return frozenset({"replaces_kv", "edits_out"}) if self.method == "mad" else frozenset()

    def view_size(self, native: int) -> int:
        return self.view or native

    def stride_for(self, view: int) -> int:
        return self.stride or (16 if view >= 64 else max(1, view // 4))

    # ---- run ------------------------------------------------------------------------------------
    def begin(self, run) -> None:
        if not isinstance(run.store.get(self), dict) or "views" not in run.store[self]:
            raise ValueError(
                "Panorama changes the denoising loop: run it through ac.ControlledPipeline (ac.load(...)), not ac.attach"
            )

    def attends(self, run) -> bool:
        """Only for ``method="mad"`` (MultiDiffusion changes the loop, not the attention)."""
        return self.method == "mad"

    def _merges(self, call) -> bool:
        if call.k_text is not None:
            return True  # cross-attention: merged at every step
        state = call.run.state
        return state is None or state.index < int(round(self.switch * state.num_steps))

    def replaced_rows(self, call) -> slice | None:
        """Where MAD merges, its output replaces the whole layer's: the per-view SDPA is skipped."""
        return slice(0, call.batch) if self._merges(call) else None

    def out(self, call, o):
        if not self._merges(call):
            return o
        views: Views = call.run.store[self]["views"]
        b, heads, n_tok, d = call.q.shape
        n_views = len(views)
        if b % n_views:
            raise ValueError(f"MAD expects all {n_views} views in one batch, got {b} rows")
        g = b // n_views
        q = call.q.reshape(g, n_views, heads, n_tok, d)
        scale = sdpa_scale(call.scale, d)
        if call.k_text is None:
            k = call.k.reshape(g, n_views, heads, -1, d)
            v = call.v.reshape(g, n_views, heads, -1, d)
            out = merged_attention(q, k, v, views, scale, self.chunk)
        else:
            if call.mask is not None:
                raise NotImplementedError("MAD's merged cross-attention takes no attention mask")
            k = call.k.reshape(g, n_views, heads, -1, d)[:, 0]  # one prompt per group: the same text keys
            v = call.v.reshape(g, n_views, heads, -1, d)[:, 0]
            out = merged_cross_attention(q, k, v, views, scale)
        return out.reshape(b, heads, n_tok, -1).to(o.dtype)
