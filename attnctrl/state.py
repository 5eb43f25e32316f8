"""Per-run state set explicitly by the denoising loop: which step, and which batch row is what.

Nothing here is global and nothing is counted from attention calls: the loop (or, for
`attach`, a pre-forward hook on the denoiser that reads the timestep it is given) writes
`RunContext.state` before every denoiser call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class StepState:
    """Where the loop is: step `index` of `num_steps`, at scheduler timestep `timestep` (a float)."""

    index: int
    timestep: float
    num_steps: int

    @property
    def fraction(self) -> float:
        """Progress in [0, 1): index / num_steps."""
        return self.index / max(self.num_steps, 1)


@dataclass(frozen=True)
class BatchLayout:
    """Which rows of the denoiser batch belong to which branch.

    The batch is the concatenation of `branches` (e.g. ``("uncond", "cond", "perturbed")``), each
    holding `images` rows in image order (prompt-major, then ``num_images_per_prompt``).
    """

    branches: tuple[str, ...]
    images: int

    @classmethod
    def build(cls, images: int, cfg: bool, extra: Sequence[str] = ()) -> "BatchLayout":
        base = ("uncond", "cond") if cfg else ("cond",)
        dup = [b for b in extra if b in base]
        if dup or len(set(extra)) != len(extra):
            raise ValueError(f"duplicate batch branch names: {list(extra)}")
        return cls(base + tuple(extra), images)

    @property
    def size(self) -> int:
        return len(self.branches) * self.images

    def has(self, branch: str) -> bool:
        return branch in self.branches

    def rows(self, branch: str) -> slice:
        """Row slice of `branch`; KeyError naming the present branches if it is absent."""
        try:
            i = self.branches.index(branch)
        except ValueError:
            raise KeyError(f"branch {branch!r} not in batch layout {self.branches}") from None
        return slice(i * self.images, (i + 1) * self.images)

    def split(self, batch) -> dict[str, Any]:
        """Split a batch tensor along dim 0 into ``{branch: rows}`` (views, no copy)."""
        parts = batch.chunk(len(self.branches))
        return dict(zip(self.branches, parts))


@dataclass
class RunContext:
    """Everything one controlled run shares with its attention processors.

    `state` and `layout` are (re)written by the loop; `grid` is the image-token grid (h, w) at the
    denoiser's input; `text_len` the number of text tokens in joint sequences (FLUX single blocks
    need it to split their concatenated sequence); `store` is scratch space controls may use,
    keyed by control, created empty for each run.
    """

    family: str
    layout: BatchLayout
    grid: tuple[int, int]
    state: StepState | None = None
    text_len: int | None = None
    prompts: list[str] = field(default_factory=list)
    store: dict[Any, Any] = field(default_factory=dict)
    # the per-layer plan: layer name -> list of (control, heads or None); filled by `plan.build_plan`
    plan: dict[str, list] = field(default_factory=dict)
