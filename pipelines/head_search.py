"""HeadHunter: greedy selection of self-attention heads for perturbation guidance.

"Fine-Grained Perturbation Guidance via Attention Head Selection" (Ahn et al. 2025,
arXiv:2506.10978) finds that single attention heads govern distinct visual concepts, and selects
the heads to perturb (with SoftPAG, ``A' = (1 − u)·A + u·I``) by iteratively composing heads that
maximise a user-chosen objective on generated images. `search_heads` implements that loop:

* round 0 scores every candidate head alone: the mean scorer value over prompts × seeds of the
  images generated with ``HeadPerturbation(heads=[h], scale, softness)``; the best one is picked;
* each following round tries adding each of the ``top_k`` best-scoring remaining single heads to
  the current set and keeps the best addition if it raises the score; otherwise the search stops.

At most ``rounds`` heads are picked. Evaluations are cached per head set in a JSON file, so an
interrupted or extended search resumes without regenerating anything it already scored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnctrl.controls.perturbation import KINDS, HeadPerturbation
from attnctrl.scorers import apply_scorer, get_scorer, scorer_id
from attnctrl.selectors import select

from .controlled import ControlledPipeline

__all__ = ["HeadSearchResult", "candidate_heads", "evaluate_heads", "model_fingerprint", "search_heads"]

Head = tuple  # (layer name, head index)
CACHE_FORMAT = 1
#: call arguments `search_heads` sets itself
RESERVED = (
    "prompt",
    "controls",
    "seed",
    "generator",
    "output_type",
    "num_inference_steps",
    "num_images_per_prompt",
    "latents",
    "return_dict",
)


# ------------------------------------------------------------------------------------ result


@dataclass
class HeadSearchResult:
    """Outcome of `search_heads`.

    heads:     picked (layer name, head index) pairs, in the order they were added.
    score:     mean score of the images generated with all of `heads` perturbed.
    history:   one entry per round: ``{"round", "base", "tried": [{"head", "score"}], "picked", "score"}``
               (``picked`` is None in the round that stopped the search).
    scorer:    the scorer's name. baseline: mean score without perturbation (None if not run).
    settings:  model, prompts, seeds, candidates, rounds, top_k, scale, softness, kind, steps, call kwargs.
    generated: head sets evaluated by generating images in this run; cached: those read from the cache.
    """

    heads: list
    score: float
    history: list
    scorer: str
    settings: dict
    baseline: float | None = None
    generated: int = 0
    cached: int = 0
    cache_file: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        from attnctrl import __version__

        return {
            "heads": [[layer, int(h)] for layer, h in self.heads],
            "score": self.score,
            "scorer": self.scorer,
            "baseline": self.baseline,
            "settings": self.settings,
            "history": self.history,
            "method": "HeadHunter (arXiv:2506.10978)",
            "attnctrl_version": __version__,
        }

    def to_json(self, path) -> Path:
        """Write the result as JSON (``{"heads": [[layer, head], ...], "score", "scorer", "settings",
        "history", ...}``), atomically; ``HeadPerturbation(heads=path)`` loads the heads back."""
        path = Path(path)
        _write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def from_json(cls, path) -> HeadSearchResult:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            heads=[(layer, int(h)) for layer, h in data["heads"]],
            score=data["score"],
            history=data.get("history", []),
            scorer=data.get("scorer", ""),
            settings=data.get("settings", {}),
            baseline=data.get("baseline"),
        )

    def perturbation(self, **overrides) -> HeadPerturbation:
        """A `HeadPerturbation` on the found heads with the searched scale / softness / kind (overridable)."""
        kw = {k: self.settings[k] for k in ("scale", "softness", "kind") if k in self.settings}
        kw.update(overrides)
        return HeadPerturbation(heads=list(self.heads), **kw)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# ---------------------------------------------------------------------------------- helpers


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=repr, separators=(",", ":"))


def _head_key(heads: Sequence[Head]) -> str:
    return _canonical(sorted([layer, int(h)] for layer, h in heads))


def model_fingerprint(pipe) -> str:
    """A digest of a pipeline's identity for cache keys: its class, scheduler config, and the names,
    shapes, dtypes and first values of every parameter of its modules (cheap on any model size)."""
    inner = getattr(pipe, "pipe", pipe)
    h = hashlib.sha256(type(inner).__name__.encode())
    scheduler = getattr(inner, "scheduler", None)
    if scheduler is not None:
        h.update(type(scheduler).__name__.encode())
        config = {
            k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")
        }  # "_use_default_values" is unordered
        h.update(_canonical(config).encode())
    components = getattr(inner, "components", {}) or {}
    for name in sorted(components):
        module = components[name]
        if not isinstance(module, torch.nn.Module):
            continue
        h.update(name.encode())
        for pname, p in module.named_parameters():
            h.update(f"{pname}{tuple(p.shape)}{p.dtype}".encode())
            if p.device.type != "meta" and p.numel():
                h.update(p.detach().reshape(-1)[:8].to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def candidate_heads(pipe, selector="self", height: int | None = None, width: int | None = None) -> list[Head]:
    """Every (layer name, head) of the self-attention layers `selector` matches (its ``heads=``
    restriction honoured), in model order. Layers without a self part (UNet cross-attention) are
    skipped; a selector that matches no self-attention layer is an error."""
    grid = pipe.default_grid(height, width)
    picked = [(layer, heads) for layer, heads in select(pipe.layers(), selector, grid) if layer.has_part("self")]
    if not picked:
        raise ValueError(f"candidate selector {selector!r} matches no self-attention layer")
    return [
        (layer.name, h) for layer, heads in picked for h in (sorted(heads) if heads is not None else range(layer.heads))
    ]


@contextlib.contextmanager
def _quiet(pipe):
    """Silence the wrapped pipeline's per-step progress bar during the search; restore it after."""
    inner = getattr(pipe, "pipe", pipe)
    had = hasattr(inner, "_progress_bar_config")
    old = getattr(inner, "_progress_bar_config", None)
    if hasattr(inner, "set_progress_bar_config"):
        inner.set_progress_bar_config(**{**(old or {}), "disable": True})
    try:
        yield
    finally:
        if had:
            inner._progress_bar_config = old
        elif hasattr(inner, "_progress_bar_config"):
            del inner._progress_bar_config


def evaluate_heads(
    pipe,
    heads: Sequence[Head],
    prompts: list[str],
    seeds: list[int],
    scorer,
    *,
    scale=3.0,
    softness=1.0,
    kind="identity",
    steps: int,
    **call_kwargs,
) -> list[float]:
    """Scores of the images generated with `heads` perturbed (no perturbation if empty).

    One pipeline call per seed with all prompts as a batch, each image with its own CPU generator
    seeded with the seed (so an image does not depend on the other prompts); images are scored
    together, seed-major: ``[(s0, p0), (s0, p1), ..., (s1, p0), ...]``.
    """
    name = scorer_id(scorer)
    scorer = get_scorer(scorer)
    images, image_prompts = [], []
    for seed in seeds:
        controls = [HeadPerturbation(heads=list(heads), scale=scale, softness=softness, kind=kind)] if heads else []
        generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]
        out = pipe(
            list(prompts),
            controls=controls,
            generator=generators,
            num_inference_steps=steps,
            output_type="pil",
            **call_kwargs,
        )
        images.extend(out.images)
        image_prompts.extend(prompts)
    return apply_scorer(scorer, images, image_prompts, name)


class _Cache:
    """Evaluations of one search context (model, scorer, prompts, seeds, settings) by head set,
    in ``cache_dir/heads-<digest>.json``; written atomically and merged with what is on disk."""

    def __init__(self, cache_dir, context: dict):
        self.context = context
        self.entries: dict[str, dict] = {}
        self.path = None
        if cache_dir is None:
            return
        directory = Path(cache_dir)
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"cache directory {str(directory)!r} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(_canonical(context).encode()).hexdigest()[:20]
        self.path = directory / f"heads-{digest}.json"
        self.entries = self._read()

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") == CACHE_FORMAT and _canonical(data.get("context")) == _canonical(self.context):
                return dict(data["evaluations"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        warnings.warn(
            f"ignoring unreadable or foreign head-search cache {str(self.path)!r}; it will be rewritten", stacklevel=2
        )
        return {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        if self.path is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged = {**self._read(), **self.entries}  # keep what a concurrent search wrote
        self.entries = merged
        _write_json_atomic(self.path, {"format": CACHE_FORMAT, "context": self.context, "evaluations": merged})


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_inputs(prompts, seeds, rounds, top_k, scale, softness, kind, call_kwargs):
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
    if isinstance(seeds, int):
        seeds = [seeds]
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers in [0, 2**63), got {seeds!r}")
    _positive_int("rounds", rounds)
    _positive_int("top_k", top_k)
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    if not (isinstance(softness, (int, float)) and not isinstance(softness, bool) and 0 < softness <= 1):
        raise ValueError(f"softness must be in (0, 1], got {softness!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    reserved = sorted(k for k in call_kwargs if k in RESERVED)
    if reserved:
        raise TypeError(
            f"search_heads sets {reserved} itself (use prompts=, seeds=, steps=; controls are not combined)"
        )
    return prompts, seeds


def _argmax(scored: list[tuple[Head, float]]) -> tuple[Head, float]:
    """Highest score; ties go to the earliest candidate (model order), so results are deterministic."""
    best = scored[0]
    for item in scored[1:]:
        if item[1] > best[1]:
            best = item
    return best


# ----------------------------------------------------------------------------------- search


def search_heads(
    pipe,
    prompts: list[str],
    seeds: list[int],
    scorer,
    rounds: int,
    top_k: int,
    candidates="self",
    scale: float = 3.0,
    softness: float = 1.0,
    steps: int | None = None,
    cache_dir=None,
    progress: bool = True,
    *,
    kind: str = "identity",
    baseline: bool = True,
    model_id: str | None = None,
    spread=None,
    **call_kwargs,
) -> HeadSearchResult:
    """Greedy HeadHunter search (Ahn et al. 2025) for the self-attention heads to perturb.

    Args:
        pipe: a `ControlledPipeline` (or a diffusers pipeline, wrapped).
        prompts, seeds: every head set is scored on the images of all prompts × seeds.
        scorer: a registered name (``"sharpness"``), ``"package.module:function"``, or a callable
            ``scorer(images, prompts) -> list[float]``, higher is better (see `attnctrl.heads.scorers`).
        rounds: most heads to pick (round 0 picks the best single head).
        top_k: how many of the best remaining single heads each later round tries to add.
        candidates: layer selector for the candidate layers (self-attention parts only; ``heads=`` honoured).
        scale, softness, kind: the `HeadPerturbation` (SoftPAG) used for every evaluation.
        steps: denoising steps per image (default: the pipeline's).
        cache_dir: folder for the evaluation cache (resumable searches); None: no cache.
        progress: a tqdm bar over evaluations.
        baseline: also score the unperturbed images (reported, not used for selection).
        model_id: a label for the model in the result (the cache key also holds a weight fingerprint).
        spread: ``spread(evaluate, head_sets) -> scores`` runs one round's evaluations (default: one
            after the other); ``attnctrl heads search`` passes one that splits them across processes,
            every process then getting all the scores (`generated`/`cached` count this process's).
        **call_kwargs: the pipeline's own arguments (``guidance_scale``, ``height``, ``negative_prompt``...).
    """
    prompts, seeds = _check_inputs(prompts, seeds, rounds, top_k, scale, softness, kind, call_kwargs)
    if not isinstance(pipe, ControlledPipeline):
        pipe = ControlledPipeline(pipe)
    name = scorer_id(scorer)
    scorer_fn = get_scorer(scorer)
    if steps is None:
        steps = pipe.call_defaults().get("num_inference_steps") or 50
    _positive_int("steps", steps)
    cands = candidate_heads(pipe, candidates, call_kwargs.get("height"), call_kwargs.get("width"))

    fingerprint = model_fingerprint(pipe)
    label = model_id or getattr(pipe.pipe, "name_or_path", None) or type(pipe.pipe).__name__
    call_kw = json.loads(_canonical(call_kwargs))
    perturb = {"scale": float(scale), "softness": float(softness), "kind": kind}
    context = {
        "model": fingerprint,
        "scorer": name,
        "prompts": prompts,
        "seeds": seeds,
        "steps": steps,
        "perturbation": perturb,
        "call_kwargs": call_kw,
        "defaults": json.loads(_canonical(pipe.defaults)),
    }
    cache = _Cache(cache_dir, context)
    settings = {
        "model": label,
        "model_fingerprint": fingerprint,
        "prompts": prompts,
        "seeds": seeds,
        "candidates": candidates,
        "rounds": rounds,
        "top_k": top_k,
        **perturb,
        "steps": steps,
        "call_kwargs": call_kw,
    }

    from tqdm.auto import tqdm

    total = int(baseline) + len(cands) + (rounds - 1) * min(top_k, max(len(cands) - 1, 0))
    bar = tqdm(total=total, desc="head search", unit="eval", disable=not progress, dynamic_ncols=True)
    counts = {"generated": 0, "cached": 0}
    postfix: dict = {}

    def evaluate(heads: list[Head]) -> float:
        key = _head_key(heads)
        hit = cache.get(key)
        if hit is None:
            scores = evaluate_heads(
                pipe,
                heads,
                prompts,
                seeds,
                scorer_fn,
                scale=scale,
                softness=softness,
                kind=kind,
                steps=steps,
                **call_kwargs,
            )
            hit = {"heads": json.loads(key), "score": sum(scores) / len(scores), "scores": scores}
            cache.put(key, hit)
            counts["generated"] += 1
        else:
            counts["cached"] += 1
        postfix["cached"] = counts["cached"]
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        return float(hit["score"])

    run = spread or (lambda fn, head_sets: [fn(heads) for heads in head_sets])
    history: list[dict] = []
    try:
        with _quiet(pipe):
            base_score = run(evaluate, [[]])[0] if baseline else None
            single = list(zip(cands, run(evaluate, [[h] for h in cands])))
            best, score = _argmax(single)
            chosen = [best]
            history.append(
                {
                    "round": 0,
                    "base": [],
                    "tried": [{"head": [layer, h], "score": s} for (layer, h), s in single],
                    "picked": list(best),
                    "score": score,
                }
            )
            postfix.update(heads=1, best=f"{score:.4g}")
            ranking = [h for h, _ in sorted(single, key=lambda item: -item[1])]  # stable: ties keep model order
            for r in range(1, rounds):
                shortlist = [h for h in ranking if h not in chosen][:top_k]
                if not shortlist:
                    break
                tried = list(zip(shortlist, run(evaluate, [[*chosen, h] for h in shortlist])))
                h_best, s_best = _argmax(tried)
                improved = s_best > score
                history.append(
                    {
                        "round": r,
                        "base": [list(h) for h in chosen],
                        "tried": [{"head": [layer, h], "score": s} for (layer, h), s in tried],
                        "picked": list(h_best) if improved else None,
                        "score": s_best if improved else score,
                    }
                )
                if not improved:
                    break
                chosen.append(h_best)
                score = s_best
                postfix.update(heads=len(chosen), best=f"{score:.4g}")
        bar.total = bar.n
        bar.refresh()
    finally:
        bar.close()
    return HeadSearchResult(
        heads=chosen,
        score=score,
        history=history,
        scorer=name,
        settings=settings,
        baseline=base_score,
        generated=counts["generated"],
        cached=counts["cached"],
        cache_file=str(cache.path) if cache.path else None,
    )
