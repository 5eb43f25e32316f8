"""Per-run state set explicitly by the denoising loop: which step, and which batch row is what.

Nothing here is global and nothing is counted from attention calls: the loop (or, for
`attach`, a pre-forward hook on the denoiser that reads the timestep it is given) writes
`RunContext.state` before every denoiser call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


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
    def build(cls, images: int, cfg: bool, extra: Sequence[str] = ()) -> BatchLayout:
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
class TextEncoders:
    """What a run knows of its text side, set by the pipelines layer so that no control needs the
    pipeline: the tokenizers under the pipeline's attribute names (``tokenizer``, ``tokenizer_2``,
    ``tokenizer_3``; `attnctrl.tokens` reads them as it reads a pipeline), the CLIP length, the run's
    T5 length (``max_sequence_length``; None without T5), and ``encode(texts)``: the pipeline's own
    prompt embeddings of `texts`, one each, without CFG, shaped (len, L, C)."""

    tokenizer: Any = None
    tokenizer_2: Any = None
    tokenizer_3: Any = None
    tokenizer_max_length: int = 77
    max_sequence_length: int | None = None
    encode: Callable[[list[str]], Any] | None = None


def images_per_prompt(images: int, prompts: int) -> int:
    """Images per prompt in a prompt-major batch of `images` images for `prompts` prompts (at least 1)."""
    return max(images // max(prompts, 1), 1)


def prompt_index(image: int, images: int, prompts: int) -> int:
    """Which prompt (0-based) image `image` of a prompt-major batch of `images` images shows."""
    return min(image // images_per_prompt(images, prompts), prompts - 1)


@dataclass
class RunContext:
    """Everything one controlled run shares with its controls and attention processors.

    Written by the loop: `state` (the step) and `layout` (which batch row is what). Set once by
    `ControlledPipeline` or `attach`: `family`; `grid`, the image-token grid (h, w) at the denoiser's
    input; `pixel_size`, the image's (H, W) in pixels; `text_len`, the number of text tokens in joint
    sequences; `prompts`, one per prompt (images are prompt-major); `text`, the tokenizers and
    prompt encoding (`TextEncoders`); `denoiser`, the UNet or transformer; `timesteps`, the
    scheduler's; `invert(image, prompt, guidance_scale=..., **kw)`, the inversion of a real image to
    every timestep of the run (`attnctrl.inversion.invert_trajectory` on the run's pipeline).
    `store` holds the controls' per-run state, keyed by control, created empty for each run.
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
    pixel_size: tuple[int, int] | None = None
    text: TextEncoders | None = None
    denoiser: Any = None
    timesteps: list[float] = field(default_factory=list)
    invert: Callable[..., Any] | None = None

    def prompt_of(self, image: int) -> str:
        """The prompt of image `image` (prompt-major: ``images // len(prompts)`` images per prompt)."""
        if not self.prompts:
            raise ValueError("this run has no prompt text (ac.attach does not see it); pass token indices")
        return self.prompts[prompt_index(image, self.layout.images, len(self.prompts))]

    def images_per_prompt(self) -> int:
        """Images per prompt of this run (`images_per_prompt`); image ``n * per`` is prompt n's first."""
        return images_per_prompt(self.layout.images, len(self.prompts))

    def needs_text(self, who: str) -> TextEncoders:
        """The run's `TextEncoders`, or a ValueError naming `who` when the run has none (ac.attach)."""
        if self.text is None or not self.prompts:
            raise ValueError(
                f"{who} needs the prompt text and the tokenizers: run it through ac.ControlledPipeline "
                "(ac.load(...)), not ac.attach"
            )
        return self.text

    def tokens(self, image: int, spec: Any) -> list[int]:
        """Indices of `spec` (a word, phrase, ``"word#2"`` or raw indices) among the text keys the
        attention layers see for image `image` (`attnctrl.tokens.joint_text_indices`)."""
        from .tokens import joint_text_indices

        text = self.needs_text("resolving words")
        return joint_text_indices(
            text, self.prompt_of(image), spec, self.family, max_sequence_length=text.max_sequence_length
        )
