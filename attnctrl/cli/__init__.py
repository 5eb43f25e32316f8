"""The ``attnctrl`` command line: generate images with controls, list attention layers, show tokens,
search perturbation heads, launch the web app.

    attnctrl generate "a red car and a white sheep" --seed 0 --steps 30 --maps -o car.png
    attnctrl generate "a cat" --control maps resolutions=16 layers="cross,up" -o cat.png
    attnctrl batch jobs.jsonl --out results      # or: accelerate launch --num_processes 4 -m attnctrl batch ...
    attnctrl layers tiny-sdxl --select "cross,res=16"
    attnctrl tokens "a red car and a white sheep" --word sheep
    attnctrl heads search --model tiny-sd --prompts prompts.txt --seeds 2 --rounds 3 --top-k 4 --scorer sharpness -o heads.json
    attnctrl app

One module per subcommand (`generate`, `batch`, `inspect`: layers and tokens, `heads`, `app`), all on
`common`. Bad input exits with status 2 and one line ``attnctrl: error: ...`` on stderr. Set
``ATTNCTRL_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from attnctrl.reproduce import reproduce_argv
from attnctrl.run_args import RunArgError, VocabularyWarning

from .common import PROG, CLIError, DropTorchvisionNotice, Parser, UsageError, one_line

__all__ = ["main", "build_parser", "reproduce_argv", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``attnctrl`` and its subcommands."""
    from attnctrl import __version__
    from attnctrl.models.tiny import TINY_MODELS

    from .app import add_app_parser
    from .batch import add_batch_parser
    from .generate import add_generate_parser
    from .heads import add_heads_parser
    from .inspect import add_inspect_parsers

    models = f"an embedded model ({', '.join(TINY_MODELS)}), a local diffusers folder or a hub id"
    parser = Parser(
        prog=PROG,
        description="Training-free attention control for diffusion models.",
        epilog="Set ATTNCTRL_DEBUG=1 to see tracebacks instead of one-line errors.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_generate_parser(sub, models)
    add_batch_parser(sub, models)
    add_inspect_parsers(sub, models)
    add_heads_parser(sub, models)
    add_app_parser(sub, models)
    return parser


#: the command-line flag of each call argument a run refuses (`attnctrl.run_args.RunArgError.argument`)
FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "height": "--height",
    "width": "--width",
    "num_images_per_prompt": "--num-images",
    "seed": "--seed",
}


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A run's `VocabularyWarning` as one line ``attnctrl: warning: ...`` on stderr; others as Python shows them."""
    if issubclass(category, VocabularyWarning):
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    log = logging.getLogger("transformers.utils.import_utils")
    notice = DropTorchvisionNotice()
    log.addFilter(notice)
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(list(argv) if argv is not None else None)
        except SystemExit as done:  # --help / --version
            return done.code if isinstance(done.code, int) else 0
        if args.command is None:
            raise UsageError(f"choose a command: generate, batch, layers, tokens, heads or app (see '{PROG} --help')")
        with warnings.catch_warnings():
            warnings.simplefilter("always", VocabularyWarning)
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, NotImplementedError) as err:
        if os.environ.get("ATTNCTRL_DEBUG") and not isinstance(err, UsageError):
            raise
        flag = FLAGS.get(err.argument or "") if isinstance(err, RunArgError) else None
        print(f"{PROG}: error: {flag + ': ' if flag else ''}{one_line(err)}", file=sys.stderr)
        return 2
    finally:
        log.removeFilter(notice)
