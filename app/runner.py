"""What the web app does per request, without Gradio: load (cached), build controls, run, reproduce.

* `ModelCache`: a small LRU of loaded `ControlledPipeline`s, each with its own lock. The pipeline
  object is shared by every session, but a run installs attention processors on its (shared)
  denoiser module for the duration of the call, so two runs on one pipeline at the same time
  would see each other's processors: runs on the same model are serialised by that model's lock.
  Different models run concurrently (up to the queue's concurrency limit).
* `Request` → `run_request`: fresh control instances for every request (no control object is
  ever reused), the "without controls" run at the same seed, the heatmaps from an
  `AttentionMaps` control (added when the user did not turn one on; it only observes, so the
  image is the same with or without it), and the exact command line and Python code of the run.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import shlex
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from attnctrl.controls.registry import (
    CONTROLS,
    ControlArgError,
    parse_control,
    parse_kwargs,
)
from attnctrl.models.loading import model_key
from attnctrl.params import declared
from attnctrl.run_args import RunArgError

__all__ = [
    "Limits",
    "ModelCache",
    "OutOfMemory",
    "Request",
    "RunResult",
    "check_words",
    "cli_command",
    "heatmap_tiles",
    "image_hash",
    "latent_hash",
    "layer_rows",
    "model_key",
    "python_code",
    "run_request",
    "word_choices",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ models


class _Entry:
    def __init__(self, key: str):
        self.key = key
        self.lock = threading.Lock()
        self.pipe = None


class ModelCache:
    """LRU of loaded pipelines (`size` at most); ``with cache.use(name) as pipe:`` holds the model's lock."""

    def __init__(self, size: int = 2, loader: Callable[[str], Any] | None = None):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size = size
        self._loader = loader
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # number of actual loads (for tests and the status line)

    def _load(self, key: str):
        if self._loader is not None:
            return self._loader(key)
        import attnctrl as ac

        pipe = ac.load(key)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _entry(self, key: str) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(key)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:  # a run holding an evicted entry keeps its own reference
                self._entries.popitem(last=False)
            return entry

    def loaded(self) -> list[str]:
        with self._lock:
            return [k for k, e in self._entries.items() if e.pipe is not None]

    def use(self, model: str | None) -> _Use:
        return _Use(self, model_key(model))


class _Use:
    def __init__(self, cache: ModelCache, key: str):
        self.cache, self.key, self.entry = cache, key, None

    def __enter__(self):
        entry = self.cache._entry(self.key)
        entry.lock.acquire()
        try:
            if entry.pipe is None:
                try:
                    entry.pipe = self.cache._load(self.key)
                    self.cache.loads += 1
                except BaseException:
                    with self.cache._lock:
                        if self.cache._entries.get(self.key) is entry:
                            del self.cache._entries[self.key]
                    raise
        except BaseException:
            entry.lock.release()
            raise
        self.entry = entry
        return entry.pipe

    def __exit__(self, *exc):
        self.entry.lock.release()
        return False


# ----------------------------------------------------------------------------------- helpers


def latent_hash(latents: torch.Tensor) -> str:
    """sha256 (first 16 hex digits) of the final latents as float32: the same seed and controls give the same hash."""
    data = latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def image_hash(image: Image.Image) -> str:
    """sha256 (first 16 hex digits) of an image's RGB pixels."""
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]


def word_choices(prompt: str) -> list[str]:
    """The prompt's words as chips: in order, repeats as ``word#2`` (what controls accept)."""
    from attnctrl.tokens import word_labels

    return word_labels(prompt or "")


def check_words(pipe, prompt: str, field_name: str, control: str, value: Any) -> None:
    """Raise a readable error if a word field names text that is not in the prompt."""
    from attnctrl.tokens import TokenError, resolve_all

    def flat(v):
        if isinstance(v, (list, tuple)):
            for x in v:
                yield from flat(x)
        elif isinstance(v, str):  # groups/lists in one string: "red car;white sheep"
            for part in re.split(r"[;,]", v):
                if part.strip():
                    yield part.strip()
        # anything else (raw token indices) is checked by the control itself

    msl = pipe.defaults.get("max_sequence_length")
    for v in flat(value):
        try:
            resolve_all(pipe, prompt, v, family=pipe.family, max_sequence_length=msl)
        except TokenError as err:
            raise ControlArgError(f"control {control}: {field_name}: {err}") from None


def layer_rows(pipe, selector: str | None, height: int | None = None, width: int | None = None) -> list[list[str]]:
    """Rows (name, kind, place, block, resolution, heads) of the layers a selector picks (all if empty)."""
    from attnctrl.layers import forward_order
    from attnctrl.selectors import select

    grid = pipe.default_grid(height, width)
    layers = forward_order(pipe.layers())
    sel = (selector or "").strip()
    if sel:
        parts = [p.strip() for p in sel.split(";")]
        picked = select(layers, parts[0] if len(parts) == 1 else parts, grid)
    else:
        picked = [(layer, None) for layer in layers]
    rows = []
    for layer, heads in picked:
        h, w = layer.grid(grid)
        head_text = str(layer.heads) if heads is None else f"{'|'.join(map(str, sorted(heads)))} of {layer.heads}"
        rows.append([layer.name, layer.kind, layer.place, str(layer.block), f"{h}x{w}", head_text])
    return rows


def heatmap_tiles(
    maps, images: Sequence[Image.Image], size: int = 192, alpha: float = 0.55
) -> list[tuple[Image.Image, str]]:
    """(overlay, caption) per word and image: the word's map (normalised, coloured) over the grey picture."""
    from attnctrl.maps import grey_base, overlay

    tiles = []
    for i, picture in enumerate(images):
        grey = grey_base(picture, size)
        for word, m in maps.words(i).items():
            caption = word if len(images) == 1 else f"image {i + 1}: {word}"
            tiles.append((overlay(m, grey, size, alpha), caption))
    return tiles


# ----------------------------------------------------------------------------------- request

#: the page's name of each call argument a run refuses (`attnctrl.run_args.RunArgError.argument`)
FIELDS = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance scale",
    "num_images_per_prompt": "images",
    "height": "height",
    "width": "width",
    "seed": "seed",
    "prompt": "prompt",
}
#: the errors a run can raise when the machine runs out of memory (CPU, or an accelerator's)
_OUT_OF_MEMORY = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


class OutOfMemory(RuntimeError):
    """A run that ran out of memory; the message says what to ask for instead. The server goes on."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (``attnctrl app --max-steps --max-pixels --max-images``);
    a request over them is refused before any work, with the limit and the flag that sets it."""

    max_steps: int = 100
    max_pixels: int = 1024 * 1024  # height x width of one image
    max_images: int = 4

    def __post_init__(self):
        for name in ("max_steps", "max_pixels", "max_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def check_size(self, height: int, width: int) -> None:
        if height * width > self.max_pixels:
            side = int(self.max_pixels**0.5)
            raise ValueError(
                f"image size {width}x{height} = {width * height} pixels is over this server's limit of "
                f"{self.max_pixels} pixels per image (attnctrl app --max-pixels): ask for a smaller image, "
                f"e.g. {side}x{side} or less"
            )


@dataclass
class Request:
    """One run as the form gives it. `controls` are ``(name, ["key=value", ...])`` in run order."""

    prompt: str
    model: str | None = None
    negative: str | None = None
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    controls: list[tuple[str, list[str]]] = field(default_factory=list)
    compare: bool = True

    def validate(self, limits: Limits | None = None) -> None:
        """Checks of the form's values and the server's `limits` that need no model (the model's own
        checks, `ControlledPipeline.check_call`, follow once it is loaded, still before any run)."""
        limits = limits if limits is not None else Limits()
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("the prompt is empty: type a text prompt describing the image")
        for name, value, lo in (
            ("seed", self.seed, 0),
            ("steps", self.steps, 1),
            ("number of images", self.num_images, 1),
        ):
            if value is None or float(value) != int(value) or int(value) < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be below 2**63, got {self.seed}")
        if int(self.steps) > limits.max_steps:
            raise ValueError(
                f"steps: at most {limits.max_steps} per run on this server (attnctrl app --max-steps), "
                f"got {int(self.steps)}: ask for fewer steps"
            )
        if int(self.num_images) > limits.max_images:
            raise ValueError(
                f"images: at most {limits.max_images} per run on this server (attnctrl app --max-images), "
                f"got {int(self.num_images)}: ask for fewer images"
            )
        if self.guidance is None:
            raise ValueError("guidance scale is empty")
        for name, pixels in (("height", self.height), ("width", self.width)):
            if pixels is not None and (float(pixels) != int(pixels) or int(pixels) < 8):
                raise ValueError(
                    f"{name} must be a whole number of pixels >= 8 (or empty for the model's default), got {pixels!r}"
                )
        if self.height is not None and self.width is not None:
            limits.check_size(int(self.height), int(self.width))
        for name, _ in self.controls:
            if name not in CONTROLS:
                raise ControlArgError(f"unknown control {name!r}; known controls: {', '.join(sorted(CONTROLS))}")

    def call_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "num_inference_steps": int(self.steps),
            "guidance_scale": float(self.guidance),
            "num_images_per_prompt": int(self.num_images),
        }
        if self.height is not None:
            kw["height"] = int(self.height)
        if self.width is not None:
            kw["width"] = int(self.width)
        if self.negative:
            kw["negative_prompt"] = self.negative
        return kw

    @property
    def user_maps(self) -> bool:
        return any(name == "maps" for name, _ in self.controls)


@dataclass
class RunResult:
    images: list
    baseline: list
    heatmaps: list
    latent_hash: str
    baseline_hash: str
    image_hashes: list
    cli: str
    python: str
    seconds: float
    model: str
    size: tuple[int, int]
    note: str = ""

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "size": f"{self.size[0]}x{self.size[1]}",
            "latent_hash": self.latent_hash,
            "baseline_latent_hash": self.baseline_hash,
            "image_hashes": self.image_hashes,
            "seconds": round(self.seconds, 2),
        }


def build_controls(req: Request, pipe=None) -> list:
    """Fresh control instances for a request (the user's, then maps if the user has none).

    Word fields are checked against the prompt when `pipe` is given."""
    controls = []
    for name, items in req.controls:
        if pipe is not None:
            kwargs = parse_kwargs(CONTROLS[name], items, name=name)
            takes_words = {k for k, d in declared(CONTROLS[name]).items() if d.words is not None}
            for key, value in kwargs.items():
                if key in takes_words and value is not None:
                    check_words(pipe, req.prompt, key, name, value)
        controls.append(parse_control(name, items))
    if not req.user_maps:
        controls.append(parse_control("maps", []))
    return controls


def cli_command(req: Request, size: tuple[int, int]) -> str:
    """The ``attnctrl generate`` command that reproduces the run (image and heatmaps)."""
    from attnctrl.reproduce import PROG, reproduce_argv

    width, height = size
    params = {
        "prompt": req.prompt,
        "model": model_key(req.model),
        "seed": int(req.seed),
        "steps": int(req.steps),
        "guidance": float(req.guidance),
        "height": height,
        "width": width,
        "negative_prompt": req.negative or None,
        "num_images": int(req.num_images),
        "controls": [
            {"name": name, "args": dict(item.split("=", 1) for item in items)} for name, items in req.controls
        ],
    }
    argv = [PROG, *reproduce_argv(params)]
    if not req.user_maps:
        argv.append("--maps")
    argv += ["-o", "attnctrl.png"]
    return shlex.join(argv)


def python_code(req: Request, size: tuple[int, int]) -> str:
    """Python that reproduces the run with the library's API."""
    width, height = size
    imports, calls = [], []
    for name, items in req.controls:
        cls = CONTROLS[name]
        kwargs = parse_kwargs(cls, items, name=name)
        line = f"from {cls.__module__} import {cls.__name__}"
        if line not in imports:
            imports.append(line)
        calls.append(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
    if not req.user_maps:
        calls.append("ac.AttentionMaps()")
    args = [
        repr(req.prompt),
        f"seed={int(req.seed)}",
        f"num_inference_steps={int(req.steps)}",
        f"guidance_scale={float(req.guidance)!r}",
        f"height={height}",
        f"width={width}",
    ]
    if req.negative:
        args.append(f"negative_prompt={req.negative!r}")
    if req.num_images != 1:
        args.append(f"num_images_per_prompt={int(req.num_images)}")
    args.append("controls=[" + ", ".join(calls) + "]")
    lines = [
        "import attnctrl as ac",
        *imports,
        "",
        f"pipe = ac.load({model_key(req.model)!r})",
        "out = pipe(" + ",\n           ".join(args) + ")",
        "for i, image in enumerate(out.images):",
        '    image.save(f"attnctrl_{i}.png")',
        '    out.maps.save(f"attnctrl_{i}.maps.png", i, image)',
    ]
    return "\n".join(lines) + "\n"


def _check_call(pipe, req: Request, kw: dict, limits: Limits) -> list[str]:
    """The model's checks of the call (`ControlledPipeline.check_call`) and the pixel limit at the
    model's default size, before any run; returns the run's warnings. Errors name the page's field."""
    try:
        notes = pipe.check_call(req.prompt, seed=int(req.seed), **kw)
    except RunArgError as err:
        field = FIELDS.get(err.argument or "")
        raise RunArgError(f"{field}: {err}" if field else str(err), err.argument) from None
    default_h, default_w = pipe.model_facts().default_size
    limits.check_size(kw.get("height") or default_h, kw.get("width") or default_w)
    return notes


def _out_of_memory(req: Request, err: BaseException) -> OutOfMemory:
    gc.collect()  # drop what the failed run held before the next request
    size = f"{req.width or 'default'}x{req.height or 'default'}"
    return OutOfMemory(
        f"out of memory in this run ({type(err).__name__}; size {size}, {int(req.num_images)} image(s), "
        f"{int(req.steps)} steps): ask for a smaller size or fewer images, then generate again"
    )


def run_request(
    req: Request,
    cache: ModelCache,
    progress: Callable[[int, int, str], None] | None = None,
    limits: Limits | None = None,
) -> RunResult:
    """Run a request: check, load (cached), check against the model, run with controls (and
    without), collect maps. Every check is done before the first run.

    Raises ValueError subclasses (over the server's `limits`, bad model, bad control argument,
    unknown word, selector matching nothing, ...) with a readable message, and `OutOfMemory` when a
    run runs out of memory; the cache and pipeline stay usable."""
    limits = limits if limits is not None else Limits()
    req.validate(limits)
    t0 = time.perf_counter()
    key = model_key(req.model)
    with cache.use(key) as pipe:
        controls = build_controls(req, pipe)  # fresh instances, every request
        kw = req.call_kwargs()
        notes = _check_call(pipe, req, kw, limits)
        steps = kw["num_inference_steps"]
        has_user = bool(req.controls)
        runs = 2 if (req.compare and has_user) else 1
        total = runs * steps

        def callback(offset: int, label: str):
            def cb(_pipe, i, _t, _kw):
                if progress is not None:
                    progress(offset + i + 1, total, f"{label}: step {i + 1}/{steps}")
                return {}

            return cb

        def generate(**call):
            try:
                return pipe(req.prompt, seed=int(req.seed), **call, **kw)
            except _OUT_OF_MEMORY as err:
                raise _out_of_memory(req, err) from err

        out = generate(controls=controls, callback_on_step_end=callback(0, "with controls"))
        images = list(out.images)
        if runs == 2:
            base = generate(controls=[], callback_on_step_end=callback(steps, "without controls"))
            baseline, base_hash = list(base.images), latent_hash(base.latents)
            note = ""
        else:
            baseline, base_hash = images, latent_hash(out.latents)
            note = "no control is on: the run without controls is the same run" if req.compare else ""
        if not out.maps:
            raise ValueError("no attention maps were recorded: the maps control selected no layer that ran")
        tiles = heatmap_tiles(out.maps, images)
    note = " · ".join(n for n in [*notes, note] if n)
    size = images[0].size
    return RunResult(
        images=images,
        baseline=baseline,
        heatmaps=tiles,
        latent_hash=latent_hash(out.latents),
        baseline_hash=base_hash,
        image_hashes=[image_hash(im) for im in images],
        cli=cli_command(req, size),
        python=python_code(req, size),
        seconds=time.perf_counter() - t0,
        model=key,
        size=size,
        note=note,
    )
