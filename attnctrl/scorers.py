"""Image scorers for the HeadHunter head search: ``scorer(images, prompts) -> list[float]``, higher is better.

HeadHunter ("Fine-Grained Perturbation Guidance via Attention Head Selection", Ahn et al. 2025,
arXiv:2506.10978) selects attention heads by a user-chosen objective — in the paper a learned
human-preference or image-text model (PickScore, ImageReward, CLIP score, style prompts). Those need
model weights; the scorers registered here need none and work offline, but they are **proxies**: classic
no-reference statistics of the pixels, not measures of quality or prompt alignment. A noisy image is
"sharp" and "contrasty" by these measures. Use them to exercise the search, to steer toward a low-level
property on purpose, or as a cheap first pass; plug a learned scorer in for real selection
(``docs/head-search.md`` shows CLIP score, PickScore and ImageReward).

A scorer is any callable taking the generated PIL images and the prompt of each image (same length,
same order) and returning one finite float per image. ``get_scorer`` resolves a registered name or a
``"package.module:function"`` path to one.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "SCORERS",
    "Scorer",
    "apply_scorer",
    "colorfulness",
    "contrast",
    "get_scorer",
    "gradient",
    "register_scorer",
    "scorer_id",
    "sharpness",
]

Scorer = Callable[[list, list], Sequence[float]]


def _luma(image) -> np.ndarray:
    """ITU-R 601 luminance of a PIL image as float64 in [0, 1], shape (H, W)."""
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _laplacian_variance(image) -> float:
    x = _luma(image)
    if min(x.shape) < 3:
        return 0.0
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(lap.var())


def _mean_gradient(image) -> float:
    x = _luma(image)
    if min(x.shape) < 2:
        return 0.0
    gx = x[:-1, 1:] - x[:-1, :-1]
    gy = x[1:, :-1] - x[:-1, :-1]
    return float(np.sqrt(gx * gx + gy * gy).mean())


def _rms_contrast(image) -> float:
    return float(_luma(image).std())


def _colorfulness(image) -> float:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


def sharpness(images: list, prompts: list[str]) -> list[float]:
    """Variance of the Laplacian of the luminance (Pech-Pacheco et al. 2000): a no-reference focus /
    blur measure. Proxy only: noise and artifacts also raise it. Ignores the prompts."""
    return [_laplacian_variance(im) for im in images]


def gradient(images: list, prompts: list[str]) -> list[float]:
    """Mean gradient magnitude of the luminance (forward differences): edge energy. Proxy only."""
    return [_mean_gradient(im) for im in images]


def contrast(images: list, prompts: list[str]) -> list[float]:
    """RMS contrast: standard deviation of the luminance in [0, 1] (Peli 1990). Proxy only."""
    return [_rms_contrast(im) for im in images]


def colorfulness(images: list, prompts: list[str]) -> list[float]:
    """Colourfulness M of Hasler & Süsstrunk (2003), on 0-255 RGB. Proxy only."""
    return [_colorfulness(im) for im in images]


#: Built-in scorers by name. All work offline without model weights; all are pixel-statistics proxies.
SCORERS: dict[str, Scorer] = {
    "sharpness": sharpness,
    "gradient": gradient,
    "contrast": contrast,
    "colorfulness": colorfulness,
}


def register_scorer(name: str):
    """Decorator adding a scorer to `SCORERS` under `name` (then usable as ``--scorer name``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"scorer name must be a non-empty string without ':', got {name!r}")

    def add(fn: Scorer) -> Scorer:
        if not callable(fn):
            raise TypeError(f"scorer {name!r} must be callable, got {fn!r}")
        SCORERS[name] = fn
        return fn

    return add


def get_scorer(spec) -> Scorer:
    """A scorer from a registered name (``"sharpness"``), a ``"package.module:function"`` path (the
    attribute may be dotted, ``"mod:Class.method"``), or a callable (returned as is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"scorer must be a name, 'module:function' or a callable, got {spec!r}")
    spec = spec.strip()
    if spec in SCORERS:
        return SCORERS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown scorer {spec!r}; built-in: {', '.join(sorted(SCORERS))} "
            "(or give your own as 'package.module:function')"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"scorer {spec!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"scorer {spec!r}: cannot import module {module_name!r} ({err})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"scorer {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"scorer {spec!r} is not callable")
    return obj


def scorer_id(spec) -> str:
    """A stable name for a scorer, recorded in results and cache keys: the registered name or path as
    given, else the callable's ``scorer_name`` attribute, else ``module:qualname``."""
    if isinstance(spec, str):
        return spec.strip()
    for name, fn in SCORERS.items():
        if fn is spec:
            return name
    explicit = getattr(spec, "scorer_name", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    qualname = getattr(spec, "__qualname__", None) or type(spec).__qualname__
    return f"{getattr(spec, '__module__', None) or type(spec).__module__}:{qualname}"


def apply_scorer(scorer: Scorer, images: list, prompts: list[str], name: str = "") -> list[float]:
    """Call `scorer` and check it returned one finite number per image."""
    raw = scorer(images, prompts)
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        raise ValueError(f"scorer {name or scorer_id(scorer)!r} must return a list of numbers, got {raw!r}") from None
    if len(values) != len(images):
        raise ValueError(f"scorer {name or scorer_id(scorer)!r} returned {len(values)} scores for {len(images)} images")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"scorer {name or scorer_id(scorer)!r} returned non-finite scores {bad}")
    return values
