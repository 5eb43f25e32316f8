"""``attnctrl generate``: images (and per-word heatmaps) with controls; PNG metadata records the
command that regenerates each image."""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import sys
from pathlib import Path
from typing import Any

from attnctrl.reproduce import reproduce_argv

from . import common
from .common import PROG, CLIError, check_prompt, float_arg, positive_int, read_prompts, seed_int
from .init_image import add_image_arguments, image_call, read_images


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


def add_generate_parser(sub, models: str) -> None:
    from attnctrl.controls.registry import CONTROLS
    from attnctrl.models.loading import DEFAULT_MODEL

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
    g.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="text file with one prompt per line, generated as one batch (instead of PROMPT)",
    )
    g.add_argument(
        "--reference-image",
        default=None,
        metavar="PATH",
        help="style reference image for the shared control (added if absent); it is DDIM-inverted "
        "(guidance 2, any variance-preserving scheduler) to the run's timesteps and replaces the "
        "reference row (put its prompt at that place); tune with --control shared "
        "inversion_guidance=... inversion_offset=...",
    )
    g.add_argument(
        "--reference-prompt",
        default=None,
        metavar="TEXT",
        help="prompt used to invert --reference-image (default: the reference row's prompt)",
    )
    g.add_argument("--model", "-m", default=None, help=f"{models} (default: {DEFAULT_MODEL})")
    g.add_argument(
        "--seed", type=seed_int, default=None, help="random seed (default: a random one, recorded in the PNG)"
    )
    g.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: the pipeline's)")
    g.add_argument("--guidance", type=float_arg, default=None, help="guidance scale (default: the pipeline's)")
    g.add_argument("--height", type=positive_int, default=None, help="image height in pixels")
    g.add_argument("--width", type=positive_int, default=None, help="image width in pixels")
    g.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    g.add_argument("--num-images", type=positive_int, default=1, metavar="N", help="images to generate (default: 1)")
    g.add_argument(
        "--control",
        action=_ControlAction,
        nargs="+",
        metavar=("NAME", "KEY=VALUE"),
        default=[],
        help="add a control with its arguments; repeatable",
    )
    g.add_argument(
        "--panorama",
        choices=("mad", "multidiffusion"),
        default=None,
        help="a wide image as overlapping views merged every step (with --width); "
        "other settings: --control panorama view=... stride=... circular=true",
    )
    g.add_argument(
        "--maps",
        action="store_true",
        help="save per-word attention heatmaps next to the image as STEM.maps.png (also done whenever a maps control is given)",
    )
    add_image_arguments(g)
    g.add_argument("--maps-out", default=None, metavar="PATH", help="where to save the heatmaps (implies --maps)")
    g.add_argument(
        "-o",
        "--output",
        default="attnctrl.png",
        metavar="PATH",
        help="output PNG (default: attnctrl.png; several images: STEM_0.png, STEM_1.png, ...)",
    )
    g.set_defaults(func=cmd_generate)


def _generate_prompts(args: argparse.Namespace) -> list[str]:
    """The batch of prompts: PROMPT, or the non-blank lines of --prompts FILE (not both)."""
    if args.prompts is None:
        if args.prompt is None:
            raise CLIError("give a PROMPT or --prompts FILE")
        check_prompt(args.prompt)
        return [args.prompt]
    if args.prompt is not None:
        raise CLIError("give either a PROMPT or --prompts FILE, not both")
    return read_prompts(args.prompts)


def _set_reference_image(args: argparse.Namespace, specs: list, controls: list, parse_control) -> None:
    """--reference-image / --reference-prompt go to every shared control (one is added if absent)."""
    if args.reference_image is None:
        if args.reference_prompt is not None:
            raise CLIError("--reference-prompt needs --reference-image")
        return
    from attnctrl.images import open_image

    path = Path(args.reference_image)
    if not path.is_file():
        raise CLIError(f"reference image {str(path)!r} does not exist")
    if not any(name == "shared" for name, _ in specs):
        specs.append(("shared", []))
        controls.append(parse_control("shared", []))
    image = open_image(path, what="reference image")
    if args.reference_prompt is not None and not args.reference_prompt.strip():
        raise CLIError("--reference-prompt is empty")
    for (name, _), control in zip(specs, controls):
        if name == "shared":
            control.reference_image, control.reference_prompt = image, args.reference_prompt


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


def cmd_generate(args: argparse.Namespace) -> int:
    seed, written = generate(args)
    if args.seed is None:
        print(f"{PROG}: random seed {seed} (recorded in the PNG metadata)", file=sys.stderr)
    for p in written:
        print(p)
    return 0


def generate(args: argparse.Namespace, load=None) -> tuple[int, list[Path]]:
    """Run ``generate``'s parsed arguments: images (and maps) written with their PNG metadata.
    `load` gives the pipeline of a --model value (default `common.load_model`; ``attnctrl batch``
    passes its cache). Returns the seed used and the files written."""
    import diffusers
    import torch

    import attnctrl
    from attnctrl.controls.registry import parse_control
    from attnctrl.models.loading import model_key

    prompts = _generate_prompts(args)
    specs = [(name.strip().lower(), items) for name, items in args.control]
    if args.panorama is not None:  # recorded, and reproduced, as --control panorama method=...
        if any(name == "panorama" for name, _ in specs):
            raise CLIError("give --panorama or --control panorama, not both")
        specs.append(("panorama", [f"method={args.panorama}"]))
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

    init_images = read_images(args)  # --image / --mask: unreadable files fail here, before any work
    outputs = common.Outputs(image_paths + maps_paths)  # fails here, before any work, if unwritable
    try:
        pipe = (load or common.load_model)(args.model)
        defaults = pipe.call_defaults()  # the wrapped pipeline's call defaults with the model's own on top
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

        pipe, call_kw = image_call(args, pipe, init_images, kw)
        result = pipe(prompts[0] if len(prompts) == 1 else prompts, controls=controls, seed=seed, **call_kw)

        images = result.images
        width, height = images[0].size
        common_params = {
            "prompt": prompts[0],
            "prompts_file": args.prompts,
            "reference_image": args.reference_image,
            "reference_prompt": args.reference_prompt,
            "image": args.image,
            "mask": args.mask,
            "strength": args.strength,
            "negative_prompt": args.negative,
            "model": model_key(args.model),
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
            params = {**common_params, "image_index": i, "prompt": prompts[i // n]}
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
    return seed, written
