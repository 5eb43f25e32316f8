"""The ``attnctrl`` command line: generate images with controls, list attention layers, show tokens,
search perturbation heads.

    attnctrl generate "a red car and a white sheep" --seed 0 --steps 30 --maps -o car.png
    attnctrl generate "a cat" --control maps resolutions=16 layers="cross,up" -o cat.png
    attnctrl layers tiny-sdxl --select "cross,res=16"
    attnctrl tokens "a red car and a white sheep" --word sheep
    attnctrl heads search --model tiny-sd --prompts prompts.txt --seeds 2 --rounds 3 --top-k 4 --scorer sharpness -o heads.json

Bad input exits with status 2 and one line ``attnctrl: error: ...`` on stderr. Set
``ATTNCTRL_DEBUG=1`` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser", "reproduce_argv", "CLIError"]

PROG = "attnctrl"
_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2, "blocks": 3, "single": 4}


class CLIError(ValueError):
    """Bad command-line input found by the CLI itself."""


class _UsageError(Exception):
    """An argparse error, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63-1, got {text!r}")
    return v


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class _ControlAction(argparse.Action):
    """``--control NAME key=value ...``, repeatable; collects ``(name, [items])`` pairs."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, *items = values
        for item in items:
            if "=" not in item:
                raise argparse.ArgumentError(
                    self, f"{name}: expected key=value, got {item!r} (give the prompt before --control)"
                )
        specs = list(getattr(namespace, self.dest, None) or [])
        specs.append((name, items))
        setattr(namespace, self.dest, specs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``attnctrl`` and its subcommands."""
    from attnctrl import __version__
    from attnctrl.controls.registry import CONTROLS
    from attnctrl.models.loading import DEFAULT_MODEL
    from attnctrl.models.tiny import TINY_MODELS

    models = f"an embedded model ({', '.join(TINY_MODELS)}), a local diffusers folder or a hub id"
    parser = _Parser(
        prog=PROG,
        description="Training-free attention control for diffusion models.",
        epilog="Set ATTNCTRL_DEBUG=1 to see tracebacks instead of one-line errors.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser(
        "generate",
        help="generate images, optionally with attention controls",
        description="Generate images; PNG metadata records everything needed to reproduce them.",
        epilog=(
            f"Controls: {', '.join(sorted(CONTROLS))}. Give each as --control NAME key=value ...; "
            "list values are comma-separated (resolutions=16,32), layer selectors are not split "
            "(layers=cross,res=16; several separated by ';'). Put the prompt before --control."
        ),
    )
    g.add_argument("prompt", metavar="PROMPT", nargs="?", default=None, help="text prompt (or --prompts FILE)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="text file with one prompt per line, generated as one batch (instead of PROMPT)")
    g.add_argument("--reference-image", default=None, metavar="PATH",
                   help="style reference image for the shared control (added if absent); it is DDIM-inverted "
                        "and replaces the reference row (put its prompt at that place)")
    g.add_argument("--reference-prompt", default=None, metavar="TEXT",
                   help="prompt used to invert --reference-image (default: the reference row's prompt)")
    g.add_argument("--model", "-m", default=None, help=f"{models} (default: {DEFAULT_MODEL})")
    g.add_argument("--seed", type=_seed, default=None, help="random seed (default: a random one, recorded in the PNG)")
    g.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the pipeline's)")
    g.add_argument("--guidance", type=_float, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--height", type=_positive_int, default=None, help="image height in pixels")
    g.add_argument("--width", type=_positive_int, default=None, help="image width in pixels")
    g.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    g.add_argument("--num-images", type=_positive_int, default=1, metavar="N", help="images to generate (default: 1)")
    g.add_argument(
        "--control", action=_ControlAction, nargs="+", metavar=("NAME", "KEY=VALUE"), default=[],
        help="add a control with its arguments; repeatable",
    )
    g.add_argument("--maps", action="store_true", help="save per-word attention heatmaps next to the image as STEM.maps.png (also done whenever a maps control is given)")
    g.add_argument("--maps-out", default=None, metavar="PATH", help="where to save the heatmaps (implies --maps)")
    g.add_argument("-o", "--output", default="attnctrl.png", metavar="PATH",
                   help="output PNG (default: attnctrl.png; several images: STEM_0.png, STEM_1.png, ...)")
    g.set_defaults(func=_cmd_generate)

    la = sub.add_parser(
        "layers",
        help="list a model's attention layers (what a selector picks)",
        description="List the attention layers of a model, or those a layer selector matches.",
    )
    la.add_argument("model", metavar="MODEL", nargs="?", default=None, help=f"{models} (default: {DEFAULT_MODEL})")
    la.add_argument("--select", default=None, metavar="SELECTOR", help="only layers this selector matches, e.g. 'cross,res=16'")
    la.add_argument("--height", type=_positive_int, default=None, help="image height for the resolution column")
    la.add_argument("--width", type=_positive_int, default=None, help="image width for the resolution column")
    la.set_defaults(func=_cmd_layers)

    t = sub.add_parser(
        "tokens",
        help="show how each text encoder tokenizes a prompt",
        description="Show the tokens of every text encoder for a prompt, and which tokens a word selects.",
    )
    t.add_argument("prompt", metavar="PROMPT", help="text prompt")
    t.add_argument("--model", "-m", default=None, help=f"{models} (default: {DEFAULT_MODEL})")
    t.add_argument("--word", action="append", default=[], metavar="WORD",
                   help="also print the token indices of WORD (a word, phrase or 'word#2'); repeatable")
    t.set_defaults(func=_cmd_tokens)
    from attnctrl.heads.cli import add_heads_parser

    add_heads_parser(sub, models)
    from attnctrl.app.cli import add_app_parser

    add_app_parser(sub, models)
    return parser


# ------------------------------------------------------------------------------------ helpers


class _DropTorchvisionNotice(logging.Filter):
    """transformers' 'requires torchvision, falling back to the PIL processor' notice is not actionable here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _model_key(model: str | None) -> str:
    from attnctrl.models.loading import DEFAULT_MODEL

    return (model or DEFAULT_MODEL).strip()


def _load(model: str | None):
    import attnctrl as ac

    return ac.load(_model_key(model))


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise CLIError("the prompt is empty: give a text prompt describing the image")


def _generate_prompts(args: argparse.Namespace) -> list[str]:
    """The batch of prompts: PROMPT, or the non-blank lines of --prompts FILE (not both)."""
    if args.prompts is None:
        if args.prompt is None:
            raise CLIError("give a PROMPT or --prompts FILE")
        _check_prompt(args.prompt)
        return [args.prompt]
    if args.prompt is not None:
        raise CLIError("give either a PROMPT or --prompts FILE, not both")
    path = Path(args.prompts)
    if not path.is_file():
        raise CLIError(f"prompts file {str(path)!r} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read prompts file {str(path)!r}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"prompts file {str(path)!r} is empty: write one prompt per line")
    return prompts


def _set_reference_image(args: argparse.Namespace, specs: list, controls: list, parse_control) -> None:
    """--reference-image / --reference-prompt go to every shared control (one is added if absent)."""
    if args.reference_image is None:
        if args.reference_prompt is not None:
            raise CLIError("--reference-prompt needs --reference-image")
        return
    path = Path(args.reference_image)
    if not path.is_file():
        raise CLIError(f"reference image {str(path)!r} does not exist")
    if not any(name == "shared" for name, _ in specs):
        specs.append(("shared", []))
        controls.append(parse_control("shared", []))
    from attnctrl.controls.shared import _open_image

    image = _open_image(path)
    if args.reference_prompt is not None and not args.reference_prompt.strip():
        raise CLIError("--reference-prompt is empty")
    for (name, _), control in zip(specs, controls):
        if name == "shared":
            control.reference_image, control.reference_prompt = image, args.reference_prompt


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


# ----------------------------------------------------------------------------------- outputs


class _Outputs:
    """Output files reserved before generating: each is a temp file in its target's directory,
    renamed over the target only when everything was written (no half-written results)."""

    def __init__(self, targets: Sequence[Path], suffix: str = ".png", why: str = "parameters are stored as PNG metadata"):
        self.targets = [Path(p) for p in targets]
        self.suffix, self.why = suffix, why
        self.temps: list[Path] = []
        seen = set()
        for p in self.targets:
            key = os.path.abspath(p)
            if key in seen:
                raise CLIError(f"output path {str(p)!r} is used twice (image and maps must differ)")
            seen.add(key)
        try:
            for p in self.targets:
                self.temps.append(self._reserve(p))
        except BaseException:
            self.discard()
            raise

    def _reserve(self, path: Path) -> Path:
        if path.suffix.lower() != self.suffix:
            raise CLIError(f"output {str(path)!r} must end in {self.suffix} ({self.why})")
        parent = path.parent
        if not parent.is_dir():
            raise CLIError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
        if path.is_dir():
            raise CLIError(f"cannot write {str(path)!r}: it is a directory")
        tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "xb"):
                pass
        except OSError as err:
            raise CLIError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
        return tmp

    def commit(self) -> list[Path]:
        for tmp, target in zip(self.temps, self.targets):
            os.replace(tmp, target)
        self.temps = []
        return self.targets

    def discard(self) -> None:
        for tmp in self.temps:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.temps = []


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")


def _maps_path(image_path: Path) -> Path:
    return image_path.with_name(f"{image_path.stem}.maps.png")


def _pnginfo(params: dict[str, Any]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in params.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        info.add_itxt(key, text)
    info.add_itxt("attnctrl", json.dumps(params, ensure_ascii=False))
    info.add_text("Software", f"attnctrl {params['attnctrl_version']}")
    return info


def reproduce_argv(params: dict[str, Any]) -> list[str]:
    """``attnctrl generate`` arguments that regenerate an image from its ``attnctrl`` PNG metadata
    (the image is number ``image_index`` of the run)."""
    head = ["--prompts", params["prompts_file"]] if params.get("prompts_file") else [params["prompt"]]
    argv = ["generate", *head, "--model", params["model"], "--seed", str(params["seed"]),
            "--steps", str(params["steps"]), "--guidance", repr(float(params["guidance"])),
            "--height", str(params["height"]), "--width", str(params["width"])]
    if params.get("negative_prompt") is not None:
        argv += ["--negative", params["negative_prompt"]]
    if params.get("num_images", 1) != 1:
        argv += ["--num-images", str(params["num_images"])]
    for key in ("reference_image", "reference_prompt"):
        if params.get(key) is not None:
            argv += ["--" + key.replace("_", "-"), params[key]]
    for c in params.get("controls", []):
        argv += ["--control", c["name"], *(f"{k}={v}" for k, v in c["args"].items())]
    return argv


# ---------------------------------------------------------------------------------- commands


def _cmd_generate(args: argparse.Namespace) -> int:
    import diffusers
    import torch

    import attnctrl
    from attnctrl.controls.registry import parse_control
    from attnctrl.pipelines.adapters.base import call_defaults

    prompts = _generate_prompts(args)
    specs = [(name.strip().lower(), items) for name, items in args.control]
    controls = [parse_control(name, items) for name, items in specs]
    _set_reference_image(args, specs, controls, parse_control)
    want_maps = args.maps or args.maps_out is not None or any(name == "maps" for name, _ in specs)
    if want_maps and not any(name == "maps" for name, _ in specs):
        specs.append(("maps", []))
        controls.append(parse_control("maps", []))

    n = args.num_images
    total = n * len(prompts)
    out = Path(args.output)
    image_paths = [_numbered(out, i, total) for i in range(total)]
    maps_paths = []
    if want_maps:
        base = Path(args.maps_out) if args.maps_out is not None else None
        maps_paths = [_numbered(base, i, total) if base else _maps_path(p) for i, p in enumerate(image_paths)]

    outputs = _Outputs(image_paths + maps_paths)  # fails here, before any work, if unwritable
    try:
        pipe = _load(args.model)
        defaults = {**call_defaults(pipe.pipe), **pipe.defaults}  # an embedded model's own call defaults
        seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
        kw: dict[str, Any] = {
            "num_inference_steps": args.steps if args.steps is not None else defaults.get("num_inference_steps", 50),
            "guidance_scale": args.guidance if args.guidance is not None else defaults.get("guidance_scale", 7.5),
            "num_images_per_prompt": n,
        }
        for key, value in (("height", args.height), ("width", args.width), ("negative_prompt", args.negative)):
            if value is not None:
                kw[key] = value
        extra = dict(pipe.defaults)  # an embedded model's call defaults (applied by the pipeline itself)

        result = pipe(prompts[0] if len(prompts) == 1 else prompts, controls=controls, seed=seed, **kw)

        images = result.images
        width, height = images[0].size
        common = {
            "prompt": prompts[0],
            "prompts_file": args.prompts,
            "reference_image": args.reference_image,
            "reference_prompt": args.reference_prompt,
            "negative_prompt": args.negative,
            "model": _model_key(args.model),
            "seed": seed,
            "steps": kw["num_inference_steps"],
            "guidance": float(kw["guidance_scale"]),
            "height": height,
            "width": width,
            "num_images": n,
            "controls": [{"name": name, "args": dict(i.split("=", 1) for i in items)} for name, items in specs],
            "extra": extra,
            "attnctrl_version": attnctrl.__version__,
            "diffusers_version": diffusers.__version__,
            "torch_version": torch.__version__,
        }
        for i, img in enumerate(images):
            params = {**common, "image_index": i, "prompt": prompts[i // n]}
            params["command"] = shlex.join([PROG, *reproduce_argv(params)])
            info = _pnginfo(params)
            img.save(outputs.temps[i], format="PNG", pnginfo=info)
            if want_maps:
                if not result.maps:
                    raise CLIError("no attention maps were recorded: the maps control selected no layer that ran")
                grid = result.maps.render(i, picture=img)
                grid.save(outputs.temps[total + i], format="PNG", pnginfo=info)
        written = outputs.commit()
    finally:
        outputs.discard()
    if args.seed is None:
        print(f"{PROG}: random seed {seed} (recorded in the PNG metadata)", file=sys.stderr)
    for p in written:
        print(p)
    return 0


def _ordered(layers):
    return sorted(layers, key=lambda l: _PLACE_ORDER.get(l.place, 9))


def _table(header: Sequence[str], rows: list[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]

    def fmt(r):
        cells = [str(c).rjust(w) if j in right else str(c).ljust(w) for j, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def _cmd_layers(args: argparse.Namespace) -> int:
    from attnctrl.selectors import select

    pipe = _load(args.model)
    grid = pipe.default_grid(args.height, args.width)
    layers = _ordered(pipe.layers())
    picked = select(layers, args.select, grid) if args.select is not None else [(l, None) for l in layers]
    rows = []
    for layer, heads in picked:
        h, w = layer.grid(grid)
        head_text = str(layer.heads) if heads is None else f"{'|'.join(map(str, sorted(heads)))} of {layer.heads}"
        rows.append((layer.name, layer.kind, layer.place, layer.block, f"{h}x{w}", head_text))
    given = [f"{k} {v} px" for k, v in (("height", args.height), ("width", args.width)) if v]
    size = f" for {', '.join(given)}" if given else ""
    print(f"{_model_key(args.model)} ({pipe.family}): denoiser token grid {grid[0]}x{grid[1]}{size}")
    print("\n".join(_table(("name", "kind", "place", "block", "resolution", "heads"), rows, right=(3, 5))))
    kinds = {}
    for layer, _ in picked:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    by_kind = ", ".join(f"{v} {k}" for k, v in kinds.items())
    if args.select is not None:
        print(f"{len(picked)} of {len(layers)} attention layers match {args.select!r} ({by_kind})")
    else:
        print(f"{len(layers)} attention layers ({by_kind})")
    return 0


def _cmd_tokens(args: argparse.Namespace) -> int:
    from attnctrl.tokens import format_table, joint_text_indices, resolve_all, token_tables

    _check_prompt(args.prompt)
    pipe = _load(args.model)
    msl = pipe.defaults.get("max_sequence_length")
    text = format_table(token_tables(pipe, args.prompt, family=pipe.family, max_sequence_length=msl))
    lines = [text]
    for word in args.word:
        per = resolve_all(pipe, args.prompt, word, family=pipe.family, max_sequence_length=msl)
        joint = joint_text_indices(pipe.pipe, args.prompt, word, pipe.family, max_sequence_length=msl)
        enc = ", ".join(f"{k} {v}" for k, v in per.items())
        lines.append(f"{word!r}: {enc}; attention text tokens {joint}")
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    log = logging.getLogger("transformers.utils.import_utils")
    notice = _DropTorchvisionNotice()
    log.addFilter(notice)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(list(argv) if argv is not None else None)
        except SystemExit as done:  # --help / --version
            return done.code if isinstance(done.code, int) else 0
        if args.command is None:
            raise _UsageError(f"choose a command: generate, layers, tokens or heads (see '{PROG} --help')")
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (_UsageError, ValueError, TypeError, OSError, NotImplementedError) as err:
        if os.environ.get("ATTNCTRL_DEBUG") and not isinstance(err, _UsageError):
            raise
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        log.removeFilter(notice)
