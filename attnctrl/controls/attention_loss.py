"""`AttentionLossControl`: the shared machinery of the latent-optimisation controls.

AttendExcite, AStar and Conform differ only in their loss. This base class

* resolves the subject words of every prompt to token indices before the first step;
* decides whether the maps are renormalised over the prompt's tokens only (Attend-and-Excite's
  ``normalize_eot``, which its reference turns on for SD 2.1), from the tokenizer (`pads_apart`);
* picks the maps resolution (default: the latent grid / 4, i.e. 16×16 for SD at 512 px and
  32×32 for SDXL at 1024 px, as the reference's ``attn_res = ceil(width / 32)``) and plans
  only the cross-attention layers at it;
* computes explicit probabilities there **only while gradients are on** (the optimisation
  passes, conditional rows only: `attends(run)`); the main denoising pass stays on SDPA;
* averages the maps over those layers and heads per image and hands each image's subject maps
  to the subclass's `image_loss`;
* runs `attnctrl.optimizer.LatentOptimizer` in `before_step`.

What one run needs (the resolved subjects, the maps being summed, the previous step's maps) is
``run.store[self]``, set in `begin`; the control object holds only its configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch

from attnctrl.control import Control
from attnctrl.losses import smooth, token_maps
from attnctrl.optimizer import LatentOptimizer
from attnctrl.params import Range
from attnctrl.state import RunContext
from attnctrl.tokens import resolve

FAMILIES = ("sd", "sdxl")


def pads_apart(tokenizer: Any) -> bool:
    """Whether `tokenizer` pads prompts with a token of its own rather than with copies of its end token.

    SD 1.x's CLIP tokenizer pads with ``<|endoftext|>``; SD 2.x's OpenCLIP tokenizer pads with
    ``"!"`` (id 0). Attend-and-Excite's reference renormalises the maps over the prompt's tokens
    only (``normalize_eot=True``) exactly for SD 2.1, so the loss controls do it when this is true.
    (SDXL's first tokenizer, the one the maps' tokens are resolved with, pads with its end token.)
    """
    pad, eos = getattr(tokenizer, "pad_token", None), getattr(tokenizer, "eos_token", None)
    return pad is not None and eos is not None and str(pad) != str(eos)


def eot_index(tokenizer: Any, prompt: str) -> int:
    """Position of the end-of-text token of `prompt` (1 + its number of tokens; truncated at the
    tokenizer's length): Attend-and-Excite's ``len(tokenizer(prompt).input_ids) − 1``."""
    limit = getattr(tokenizer, "model_max_length", None)
    kw = {"truncation": True, "max_length": limit} if isinstance(limit, int) and limit < 100_000 else {}
    return len(tokenizer(prompt, **kw).input_ids) - 1


def parse_thresholds(value: Any, default: dict) -> dict[int, float]:
    """Refinement thresholds as ``{step: value}`` from a dict, ``"0:0.05,10:0.5"`` or a list of ``"k:v"``.

    None → `default`; ``""`` / ``{}`` / ``[]`` → no refinement."""
    if value is None:
        return dict(default)
    if isinstance(value, dict):
        items = list(value.items())
    else:
        parts = value.split(",") if isinstance(value, str) else list(value)
        items = []
        for part in (str(p).strip() for p in parts):
            if not part:
                continue
            key, sep, val = part.partition(":")
            if not sep:
                raise ValueError(f"refinement threshold {part!r}: write step:value, e.g. 10:0.5")
            items.append((key, val))
    try:
        return {int(k): float(v) for k, v in items}
    except (TypeError, ValueError):
        raise ValueError(f"refinement thresholds must map step indices to numbers, got {value!r}") from None


class AttentionLossControl(Control):
    """Base of controls that optimise the latents against a loss on cross-attention maps.

    Subclasses define `subject_specs()` (the token specs whose maps the loss reads, in order) and
    `image_loss(run, maps, image)` on the (S, H, W) subject maps of one image at step ``run.state``.

    Attention hooks: only in the optimiser's gradient passes (`attends`), never in the main
    denoising pass; `steps` is the window of the latent updates (`wants_update`).
    """

    default_layers = "cross"
    effects = frozenset({"reads_probs"})  # `probs` only reads (explicit so gradients reach the latents)
    observes_only = False

    def __init__(
        self,
        *,
        resolution: Annotated[int | None, Range(1)] = None,
        steps: tuple[float, float] | None = (0.0, 0.5),
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        refinement: Mapping[int, float | None] | None = None,
        max_refinement: Annotated[int, Range(0)] = 20,
        softmax_scale: float | None = 100.0,
        smoothing: bool = True,
        kernel_size: int = 3,
        sigma: Annotated[float, Range(0, lo_open=True)] = 0.5,
        normalize_eot: bool | None = None,
        layers=None,
    ):
        super().__init__(layers=layers, steps=steps)
        self.resolution = resolution
        self.optimizer = LatentOptimizer(
            scale_factor, (float(scale_range[0]), float(scale_range[1])), dict(refinement or {}), max_refinement
        )
        self.softmax_scale = softmax_scale
        self.smoothing = smoothing
        self.kernel_size = kernel_size
        self.sigma = sigma
        self.normalize_eot = None if normalize_eot is None else bool(normalize_eot)

    # ---- what subclasses define --------------------------------------------------------------
    def subject_specs(self) -> list:
        raise NotImplementedError

    def image_loss(self, run: RunContext, maps: torch.Tensor, image: int) -> torch.Tensor:
        """The loss of image `image`'s (S, H, W) subject maps at step ``run.state``."""
        raise NotImplementedError

    def prompt_specs(self, index: int, prompt: str) -> list:
        """Token specs of prompt number `index` (default: `subject_specs()` for every prompt)."""
        return self.subject_specs()

    def enabled(self) -> bool:
        """False when the settings are neutral: then no pass is made and the run equals stock."""
        return bool(self.subject_specs())

    def wants_update(self, state) -> bool:
        """Whether step `state` takes a regular latent update (default: inside `steps`)."""
        return self.active(state)

    def attends(self, run: RunContext) -> bool:
        """Only in the optimiser's gradient passes (of a run with subjects): the main denoising
        pass is stock, and a pass that only measures the maps may fall outside `steps`."""
        return run.store.get(self) is not None and torch.is_grad_enabled()

    # ---- layers ------------------------------------------------------------------------------
    def narrow_layers(self, picked: list, grid: tuple[int, int]) -> list:
        """Keep the cross-attention layers at the maps resolution (explicit softmax only there)."""
        if any(layer.kind == "joint" for layer, _ in picked):
            raise NotImplementedError(self._joint_message("SD3/FLUX"))
        cross = [(layer, heads) for layer, heads in picked if layer.kind == "cross"]
        if not cross:
            raise ValueError(f"{type(self).__name__} needs cross-attention layers; {self.layers!r} picked none")
        available = sorted({layer.resolution(grid) for layer, _ in cross})
        want = self.resolution if self.resolution is not None else max(1, grid[0] // 4)
        if self.resolution is not None and want not in available:
            raise ValueError(
                f"{type(self).__name__}: no cross-attention layer at resolution {want}; available: {available}"
            )
        res = want if want in available else min(available, key=lambda r: (abs(r - want), -r))
        return [(layer, heads) for layer, heads in cross if layer.resolution(grid) == res]

    # ---- run lifetime ------------------------------------------------------------------------
    def begin(self, run: RunContext) -> None:
        run.store[self] = None
        if not self.enabled():
            return
        if run.family not in FAMILIES:
            raise NotImplementedError(self._joint_message(run.family))
        tokenizer = run.needs_text(type(self).__name__).tokenizer
        per_prompt = [
            [resolve(tokenizer, p, spec) for spec in self.prompt_specs(n, p)] for n, p in enumerate(run.prompts)
        ]
        eot = pads_apart(tokenizer) if self.normalize_eot is None else self.normalize_eot
        ends = [eot_index(tokenizer, p) if eot else None for p in run.prompts]
        for n, (subjects, end) in enumerate(zip(per_prompt, ends)):
            if end is None:
                continue
            bad = [i for idx in subjects for i in idx if not 1 <= i < end]
            if bad:
                raise ValueError(
                    f"{type(self).__name__}: token indices {bad} of prompt {n} are not among its word tokens "
                    f"1..{end - 1} (normalize_eot renormalises over those only)"
                )
        images = run.layout.images
        pick = lambda per: [per[b * len(per) // images] for b in range(images)]
        run.store[self] = {
            "subjects": pick(per_prompt),
            "ends": pick(ends),
            "normalize_eot": eot,
            "sum": None,
            "count": 0,
            "grid": None,
            "last": None,
            "previous": None,
        }

    def _joint_message(self, family: str) -> str:
        return (
            f"{type(self).__name__} optimises UNet cross-attention maps (SD 1.x/2.x, SDXL); "
            f"{family} pipelines use joint attention, which it does not support yet"
        )

    def end(self, run: RunContext) -> None:
        run.store.pop(self, None)

    # ---- attention hooks -----------------------------------------------------------------------
    def needs_probs(self, call) -> bool:
        return call.run.store.get(self) is not None and torch.is_grad_enabled()

    def probs(self, call, p: torch.Tensor) -> torch.Tensor:
        acc = call.run.store.get(self)
        if acc is None or not torch.is_grad_enabled():
            return p
        rows = p[call.run.layout.rows("cond")]
        if call.heads is not None:
            rows = rows[:, sorted(call.heads)]
        part = rows[:, :, call.q_image].sum(1)
        acc["sum"] = part if acc["sum"] is None else acc["sum"] + part
        acc["count"] += rows.shape[1]
        acc["grid"] = call.grid
        return p

    # ---- the optimisation ----------------------------------------------------------------------
    def _maps(self, acc: dict) -> torch.Tensor:
        """(B, H, W, T) maps averaged over the planned layers and heads since the last reset."""
        if acc["sum"] is None:
            raise RuntimeError(f"{type(self).__name__}: no cross-attention maps were collected during the pass")
        h, w = acc["grid"]
        maps = acc["sum"] / acc["count"]
        return maps.reshape(maps.shape[0], h, w, maps.shape[-1])

    def subject_maps(self, run: RunContext, maps: torch.Tensor, image: int) -> torch.Tensor:
        """(S, H, W) preprocessed maps of image `image`'s subjects (softmax over text, smoothing)."""
        acc = run.store[self]
        subj = token_maps(
            maps[image], acc["subjects"][image], softmax_scale=self.softmax_scale, last=acc["ends"][image]
        )
        return smooth(subj, self.kernel_size, self.sigma) if self.smoothing else subj

    def _losses(self, run: RunContext, z: torch.Tensor, denoise) -> torch.Tensor:
        acc = run.store[self]
        acc["sum"], acc["count"] = None, 0
        denoise(z)
        maps = self._maps(acc)
        acc["sum"] = None
        per_image, last = [], []
        for b in range(maps.shape[0]):
            subj = self.subject_maps(run, maps, b)
            last.append(subj.detach())
            per_image.append(self.image_loss(run, subj, b))
        acc["last"] = last
        return torch.stack(per_image)

    def before_step(self, run: RunContext, latents: torch.Tensor, denoise) -> torch.Tensor:
        acc, state = run.store.get(self), run.state
        if acc is None or state is None:  # no subjects this run (the loop always sets the step)
            return latents
        acc["previous"], acc["last"] = acc["last"], None
        loss_fn = lambda z: self._losses(run, z, denoise)
        out = self.optimizer.run(latents, state.index, state.num_steps, loss_fn, self.wants_update(state))
        if acc["last"] is None and self.measures(state):
            with torch.enable_grad():  # explicit maps are only computed in gradient passes
                loss_fn(latents.detach().requires_grad_(True))
        return out

    def measures(self, state) -> bool:
        """Whether to measure the maps at a step without an update (for the next step's loss)."""
        return False

    def previous_maps(self, run: RunContext, image: int) -> torch.Tensor | None:
        """Detached subject maps of `image` from the last measurement of the previous step (or None)."""
        acc = run.store.get(self)
        prev = acc["previous"] if acc else None
        return None if prev is None else prev[image]


def as_list(value: Any, what: str) -> list:
    """A list from a list/tuple, a single item, or None (→ [])."""
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise TypeError(f"{what} must be a list, got {value!r}")
