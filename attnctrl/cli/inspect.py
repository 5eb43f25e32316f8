"""``attnctrl layers`` and ``attnctrl tokens``: what a selector picks, how a prompt tokenizes."""

from __future__ import annotations

import argparse

from . import common
from .common import check_prompt, positive_int, table


def add_inspect_parsers(sub, models: str) -> None:
    from attnctrl.models.loading import DEFAULT_MODEL

    la = sub.add_parser(
        "layers",
        help="list a model's attention layers (what a selector picks)",
        description="List the attention layers of a model, or those a layer selector matches.",
    )
    la.add_argument("model", metavar="MODEL", nargs="?", default=None, help=f"{models} (default: {DEFAULT_MODEL})")
    la.add_argument(
        "--select", default=None, metavar="SELECTOR", help="only layers this selector matches, e.g. 'cross,res=16'"
    )
    la.add_argument("--height", type=positive_int, default=None, help="image height for the resolution column")
    la.add_argument("--width", type=positive_int, default=None, help="image width for the resolution column")
    la.set_defaults(func=cmd_layers)

    t = sub.add_parser(
        "tokens",
        help="show how each text encoder tokenizes a prompt",
        description="Show the tokens of every text encoder for a prompt, and which tokens a word selects.",
    )
    t.add_argument("prompt", metavar="PROMPT", help="text prompt")
    t.add_argument("--model", "-m", default=None, help=f"{models} (default: {DEFAULT_MODEL})")
    t.add_argument(
        "--word",
        action="append",
        default=[],
        metavar="WORD",
        help="also print the token indices of WORD (a word, phrase or 'word#2'); repeatable",
    )
    t.set_defaults(func=cmd_tokens)


def cmd_layers(args: argparse.Namespace) -> int:
    from attnctrl.layers import forward_order
    from attnctrl.models.loading import model_key
    from attnctrl.selectors import select

    pipe = common.load_model(args.model)
    grid = pipe.default_grid(args.height, args.width)
    layers = forward_order(pipe.layers())
    picked = select(layers, args.select, grid) if args.select is not None else [(layer, None) for layer in layers]
    rows = []
    for layer, heads in picked:
        h, w = layer.grid(grid)
        head_text = str(layer.heads) if heads is None else f"{'|'.join(map(str, sorted(heads)))} of {layer.heads}"
        rows.append((layer.name, layer.kind, layer.place, layer.block, f"{h}x{w}", head_text))
    given = [f"{k} {v} px" for k, v in (("height", args.height), ("width", args.width)) if v]
    size = f" for {', '.join(given)}" if given else ""
    print(f"{model_key(args.model)} ({pipe.family}): denoiser token grid {grid[0]}x{grid[1]}{size}")
    print("\n".join(table(("name", "kind", "place", "block", "resolution", "heads"), rows, right=(3, 5))))
    kinds: dict[str, int] = {}
    for layer, _ in picked:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    by_kind = ", ".join(f"{v} {k}" for k, v in kinds.items())
    if args.select is not None:
        print(f"{len(picked)} of {len(layers)} attention layers match {args.select!r} ({by_kind})")
    else:
        print(f"{len(layers)} attention layers ({by_kind})")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from attnctrl.tokens import format_table, joint_text_indices, resolve_all, token_tables

    check_prompt(args.prompt)
    pipe = common.load_model(args.model)
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
