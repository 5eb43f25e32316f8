"""``generate --image / --mask / --strength``: img2img and inpainting from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CLIError, float_arg


def add_image_arguments(g) -> None:
    g.add_argument("--image", default=None, metavar="PNG", help="init image: img2img (or inpainting with --mask)")
    g.add_argument("--mask", default=None, metavar="PNG", help="inpainting mask: white is repainted, black kept")
    g.add_argument(
        "--strength",
        type=float_arg,
        default=None,
        metavar="S",
        help="how far the init image is noised, 0 < S <= 1 (default: the pipeline's, 0.8 img2img, 1.0 inpaint)",
    )


def read_images(args: argparse.Namespace) -> dict[str, Any]:
    """The init image and mask as RGB PIL images (checked before any model is loaded), {} without --image."""
    from attnctrl.images import open_image

    if args.image is None:
        if args.mask is not None or args.strength is not None:
            raise CLIError("--mask and --strength need --image")
        return {}
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise CLIError(f"--strength must be above 0 and at most 1, got {args.strength}: pass e.g. 0.6")
    images = {}
    for key, path, what in (("image", args.image, "init image"), ("mask_image", args.mask, "mask")):
        if path is not None:
            try:
                images[key] = open_image(Path(path), what=what)
            except ValueError as err:
                raise CLIError(str(err)) from None
    return images


def image_call(args: argparse.Namespace, pipe, images: dict[str, Any], kw: dict[str, Any]):
    """The pipeline of the run's kind and its call arguments: an img2img run takes the init image's
    size, so --height/--width resize the images; inpainting takes them as the pipeline does."""
    if not images:
        return pipe, kw
    kind = "inpaint" if "mask_image" in images else "img2img"
    pipe = pipe.as_kind(kind)
    kw = dict(kw)
    if kind == "img2img":
        h, w = kw.pop("height", None), kw.pop("width", None)
        if h is not None or w is not None:
            size = (w or images["image"].width, h or images["image"].height)
            images = {k: im.resize(size) for k, im in images.items()}
    kw.update(images)
    if args.strength is not None:
        kw["strength"] = args.strength
    return pipe, kw
