"""The arguments of a run, checked against the loaded model before any work.

One home for the rules every entry point shares (``ControlledPipeline.__call__``, so the Python API,
``attnctrl generate`` and the web app): the prompt, and every number of a call — type, finiteness
and range — given the facts of the model (`ModelFacts`: scheduler, sizes the VAE and patching
produce exactly, text-encoder depth, a closed vocabulary). Pure functions of the numbers and the
facts; the pipelines layer reads the facts from the wrapped diffusers pipeline
(`attnctrl.pipelines.facts.model_facts`).

Refused input raises `RunArgError` (a `ValueError`) whose message names the argument, the value,
the allowed range and what to do. Sizes are never rounded: a height or width the model cannot
produce exactly is refused with the nearest valid sizes, so the size asked for is the size made.
Prompt words outside a closed vocabulary are not an error (the tokenizer still encodes them, as
byte pieces the model never saw); `check_run` returns them as warning messages.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = [
    "MAX_SEQUENCE_LENGTH",
    "SEED_LIMIT",
    "ModelFacts",
    "RunArgError",
    "VocabularyWarning",
    "check_numbers",
    "check_prompt",
    "check_run",
    "check_seed",
    "check_size",
    "check_steps",
    "nearest_sizes",
    "out_of_vocabulary",
]

#: seeds are 0 <= seed < SEED_LIMIT (what torch.Generator.manual_seed, the CLI and the app accept)
SEED_LIMIT = 2**63
#: the longest T5 prompt SD3 and FLUX pipelines accept (diffusers refuses more)
MAX_SEQUENCE_LENGTH = 512


class RunArgError(ValueError):
    """A run argument that the loaded model cannot use; the message says what to pass instead.
    `argument` is the keyword's name (the CLI and the app name their own field for it)."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class VocabularyWarning(UserWarning):
    """Prompt words outside the model's closed vocabulary (e.g. the Shapes model's)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the checks need to know about a loaded model.

    size_multiple: height and width must be multiples of it (the VAE's scale factor, times the
                   patch size for SD3 and 2 for FLUX's 2×2 latent packing); `size_reason` says so.
    max_size:      the largest side in pixels the denoiser takes (SD3's position embeddings), or None.
    clip_layers:   hidden layers of the shallowest CLIP text encoder (bounds `clip_skip`), or None.
    vocabulary:    the words a closed-vocabulary model knows (lower case), or None (open vocabulary).
    """

    family: str
    scheduler: str
    num_train_timesteps: int
    size_multiple: int
    size_reason: str
    default_size: tuple[int, int]
    max_size: int | None = None
    clip_layers: int | None = None
    vocabulary: frozenset[str] | None = None


# ------------------------------------------------------------------------------------- helpers


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> TypeGuard[float]:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _num(v: float) -> str:
    return "inf" if v == math.inf else (str(int(v)) if float(v).is_integer() else repr(float(v)))


def _range_text(lo: float, hi: float) -> str:
    if hi == math.inf:
        return f">= {_num(lo)}"
    return f"from {_num(lo)} to {_num(hi)}"


def nearest_sizes(value: float, multiple: int, max_size: int | None = None) -> list[int]:
    """The valid sizes (positive multiples of `multiple`, at most `max_size`) nearest `value`:
    one if `value` is a valid size or lies beyond the ends, else the one below and the one above."""
    top = (max_size // multiple) * multiple if max_size is not None else None
    if top is not None and value >= top:
        return [top]
    if value <= multiple:
        return [multiple]
    below = int(value // multiple) * multiple
    if below == value:
        return [below]
    above = below + multiple
    return [below] if top is not None and above > top else [below, above]


# --------------------------------------------------------------------------------------- checks


def check_prompt(prompt: Any, prompt_embeds: Any = None) -> list[str]:
    """The prompts of a call (a string or a non-empty list of non-blank strings; None only with
    `prompt_embeds`)."""
    if prompt is None:
        if prompt_embeds is None:
            raise RunArgError("no prompt given: pass a prompt string (or prompt_embeds)", "prompt")
        return []
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if any(not p.strip() for p in prompts):
        raise RunArgError("prompt is empty: give a text prompt describing the image", "prompt")
    return list(prompts)


def check_seed(seed: Any) -> None:
    """A seed is a whole number 0 <= seed < 2**63 (None: no seed)."""
    if seed is not None and not (_is_int(seed) and 0 <= seed < SEED_LIMIT):
        raise RunArgError(
            f"seed must be an integer from 0 to 2**63-1, got {seed!r}: pass a non-negative whole number "
            "(or no seed for a random one)",
            "seed",
        )


def check_steps(kw: Mapping[str, Any], facts: ModelFacts) -> None:
    """`num_inference_steps` is 1 ... the scheduler's `num_train_timesteps` (for every scheduler);
    explicit `timesteps` / `sigmas` replace it and are checked instead."""
    limit = facts.num_train_timesteps
    for key in ("timesteps", "sigmas"):
        custom = kw.get(key)
        if custom is None:
            continue
        values = custom.tolist() if hasattr(custom, "tolist") else custom  # tensors and arrays
        if (
            isinstance(values, str)
            or not isinstance(values, Sequence)
            or not values
            or not all(_is_real(v) and math.isfinite(v) for v in values)
        ):
            raise RunArgError(f"{key} must be a non-empty list of finite numbers, got {custom!r}", key)
        if len(values) > limit:
            raise RunArgError(
                f"{key} has {len(values)} entries; the {facts.scheduler} allows at most {limit} "
                f"(num_train_timesteps={limit}): pass fewer",
                key,
            )
    if kw.get("timesteps") is not None or kw.get("sigmas") is not None:
        return
    steps = kw.get("num_inference_steps")
    if not (_is_int(steps) and 1 <= steps <= limit):
        todo = f"pass at most {limit}" if _is_int(steps) and steps > limit else "pass a whole number of steps, e.g. 50"
        raise RunArgError(
            f"num_inference_steps must be a positive integer from 1 to {limit} (the {facts.scheduler} has "
            f"num_train_timesteps={limit}), got {steps!r}: {todo}",
            "num_inference_steps",
        )


def check_size(name: str, value: Any, facts: ModelFacts) -> None:
    """`height` / `width` (None: the model's default) is a positive multiple of the model's
    `size_multiple`, at most its `max_size`; refused with the nearest valid sizes otherwise."""
    if value is None:
        return
    m, top = facts.size_multiple, facts.max_size
    default = facts.default_size[0 if name == "height" else 1]

    def refuse(what: str, near: Sequence[int]) -> RunArgError:
        use = " or ".join(str(s) for s in near)
        return RunArgError(f"{name} must be {what}, got {value!r}: use {use} (the model's default is {default})", name)

    if not _is_int(value) or value < 1:
        near = nearest_sizes(value, m, top) if _is_real(value) and math.isfinite(value) else [default]
        raise refuse(f"a positive integer number of pixels, a multiple of {m} ({facts.size_reason})", near)
    if value % m:
        raise refuse(f"a multiple of {m} pixels for this model ({facts.size_reason})", nearest_sizes(value, m, top))
    if top is not None and value > top:
        raise refuse(f"at most {top} pixels for this model (the denoiser's position embeddings)", [top])


#: float arguments: (lowest, highest, what to do). Checked when given (not None).
FLOAT_ARGS: dict[str, tuple[float, float, str]] = {
    "guidance_scale": (0.0, math.inf, "pass e.g. 7.5 (1 or less turns classifier-free guidance off)"),
    "guidance_rescale": (0.0, 1.0, "pass 0 (off) up to 1, e.g. 0.7"),
    "eta": (0.0, 1.0, "pass 0 (deterministic DDIM) up to 1 (DDPM-like noise)"),
    "true_cfg_scale": (0.0, math.inf, "pass e.g. 4 with a negative prompt (1 or less turns it off)"),
    "skip_layer_guidance_scale": (0.0, math.inf, "pass e.g. 2.8"),
    "skip_layer_guidance_start": (0.0, 1.0, "pass a fraction of the run, e.g. 0.01"),
    "skip_layer_guidance_stop": (0.0, 1.0, "pass a fraction of the run, e.g. 0.2"),
    "mu": (-math.inf, math.inf, "pass a finite number, or leave it unset"),
    "strength": (0.0, 1.0, "pass e.g. 0.6 (how far the init image is noised; 1 starts from noise)"),
}


def check_numbers(kw: Mapping[str, Any], facts: ModelFacts) -> None:
    """Every number of a call: steps, sizes, images per prompt, the float arguments, text lengths."""
    check_steps(kw, facts)
    n = kw.get("num_images_per_prompt", 1)
    if not (_is_int(n) and n >= 1):
        raise RunArgError(
            f"num_images_per_prompt must be a positive integer (1 or more), got {n!r}: pass a whole number, e.g. 1",
            "num_images_per_prompt",
        )
    for key in ("height", "width"):
        check_size(key, kw.get(key), facts)
    for key, (lo, hi, todo) in FLOAT_ARGS.items():
        v = kw.get(key)
        if v is None:
            continue
        finite = _is_real(v) and math.isfinite(v)
        if not finite or not lo <= v <= hi:
            what = "a finite number" + ("" if lo == -math.inf else f" {_range_text(lo, hi)}")
            raise RunArgError(f"{key} must be {what}, got {v!r}: {todo}", key)
    msl = kw.get("max_sequence_length")
    if msl is not None and facts.family in ("sd3", "flux") and not (_is_int(msl) and 1 <= msl <= MAX_SEQUENCE_LENGTH):
        raise RunArgError(
            f"max_sequence_length must be an integer from 1 to {MAX_SEQUENCE_LENGTH} (T5 prompt tokens), "
            f"got {msl!r}: pass e.g. 256",
            "max_sequence_length",
        )
    skip = kw.get("clip_skip")
    if skip is not None:
        top = (facts.clip_layers - 1) if facts.clip_layers else None
        if not (_is_int(skip) and skip >= 0 and (top is None or skip <= top)):
            bound = (
                f"from 0 to {top} (the CLIP text encoder has {facts.clip_layers} layers)" if top is not None else ">= 0"
            )
            raise RunArgError(
                f"clip_skip must be an integer {bound}, got {skip!r}: pass fewer layers to skip, or None", "clip_skip"
            )


def out_of_vocabulary(prompts: Sequence[str], vocabulary: frozenset[str] | None) -> list[str]:
    """Words of the prompts (as `attnctrl.tokens.prompt_words` splits them) that a closed
    vocabulary lacks, each once, in order; [] for an open vocabulary (None)."""
    if vocabulary is None:
        return []
    from .tokens import prompt_words

    missing: list[str] = []
    for prompt in prompts:
        for word in prompt_words(prompt):
            if word.casefold() not in vocabulary and word not in missing:
                missing.append(word)
    return missing


def check_run(kw: Mapping[str, Any], facts: ModelFacts) -> list[str]:
    """All checks of a call's keyword arguments (the pipeline's defaults merged in) before any
    work. Raises `RunArgError` (or TypeError for a prompt that is not text); returns the warning
    messages (words outside a closed vocabulary), [] when there is nothing to say."""
    prompts = check_prompt(kw.get("prompt"), kw.get("prompt_embeds"))
    check_numbers(kw, facts)
    negative = kw.get("negative_prompt")
    texts = prompts + ([negative] if isinstance(negative, str) else list(negative or []))
    missing = out_of_vocabulary([t for t in texts if isinstance(t, str)], facts.vocabulary)
    if not missing:
        return []
    known = ", ".join(sorted(w for w in facts.vocabulary or () if w.isalnum()))
    return [f"not in this model's vocabulary: {', '.join(missing)} (the model never saw them; it knows: {known})"]
