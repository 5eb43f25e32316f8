"""``attnctrl app``: launch the Gradio web app."""

from __future__ import annotations

import argparse

from .common import CLIError, positive_int


def add_app_parser(sub, models: str) -> None:
    """Add the ``app`` subcommand to the ``attnctrl`` subparsers."""
    from attnctrl.models.loading import DEFAULT_MODEL

    a = sub.add_parser(
        "app",
        help="launch the web app (Gradio)",
        description=(
            "Launch the Gradio web app: prompt with selectable words, one panel per registered control, "
            "with/without-controls comparison at the same seed, per-word attention maps, and the CLI / "
            "Python code that reproduces each run. Needs: pip install 'attnctrl[app]'."
        ),
    )
    a.add_argument(
        "--model", "-m", default=None, help=f"model preselected in the page: {models} (default: {DEFAULT_MODEL})"
    )
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    a.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    a.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="create a public gradio.live link (default: --no-share)",
    )
    a.add_argument(
        "--concurrency",
        type=positive_int,
        default=2,
        metavar="N",
        help="runs served at the same time (queue concurrency limit; runs on one model take turns). Default: 2",
    )
    a.add_argument(
        "--cache-size",
        type=positive_int,
        default=2,
        metavar="N",
        help="loaded models kept in memory (least recently used dropped first). Default: 2",
    )
    a.add_argument(
        "--max-steps",
        type=positive_int,
        default=100,
        metavar="N",
        help="most denoising steps one request may ask for (refused before any work). Default: 100",
    )
    a.add_argument(
        "--max-pixels",
        type=pixel_count,
        default=1024 * 1024,
        metavar="N|WxH",
        help="most pixels per image one request may ask for, as a count or WxH. Default: 1024x1024",
    )
    a.add_argument(
        "--max-images",
        type=positive_int,
        default=4,
        metavar="N",
        help="most images one request may ask for. Default: 4",
    )
    a.set_defaults(func=_cmd_app)


def pixel_count(text: str) -> int:
    """``--max-pixels``: a positive pixel count (``1048576``) or a size (``1024x1024``)."""
    w, sep, h = text.strip().lower().partition("x")
    try:
        n = int(w) * int(h) if sep else int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel count or WxH (e.g. 1024x1024), got {text!r}") from None
    if n < 1 or (sep and (int(w) < 1 or int(h) < 1)):
        raise argparse.ArgumentTypeError(f"must be a positive pixel count or WxH, got {text!r}")
    return n


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise CLIError("the web app needs Gradio: pip install 'attnctrl[app]'") from None
    from attnctrl.app import launch
    from attnctrl.app.runner import Limits

    launch(
        args.model,
        host=args.host,
        port=args.port,
        share=args.share,
        concurrency=args.concurrency,
        cache_size=args.cache_size,
        limits=Limits(max_steps=args.max_steps, max_pixels=args.max_pixels, max_images=args.max_images),
    )
    return 0
