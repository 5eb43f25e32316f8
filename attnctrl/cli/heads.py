"""``attnctrl heads search``: the command-line front of `attnctrl.pipelines.head_search.search_heads`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import common, procs
from .common import PROG, CLIError, Parser, UsageError, float_arg, positive_float, positive_int, read_prompts


def _softness(text: str) -> float:
    v = float_arg(text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return v


def add_heads_parser(sub, models: str) -> None:
    """``attnctrl heads search``: HeadHunter greedy head selection (arXiv:2506.10978)."""
    from attnctrl.scorers import SCORERS

    h = sub.add_parser(
        "heads",
        help="find attention heads for perturbation guidance (HeadHunter)",
        description="Attention-head tools for HeadPerturbation guidance.",
    )
    hsub = h.add_subparsers(dest="heads_command", metavar="ACTION", parser_class=Parser)
    h.set_defaults(func=_cmd_heads_missing)
    s = hsub.add_parser(
        "search",
        help="greedy search of self-attention heads that raise a score (HeadHunter)",
        description=(
            "HeadHunter (Ahn et al. 2025): score every candidate self-attention head alone by the mean "
            "scorer value of images generated with that head perturbed (SoftPAG), pick the best, then "
            "repeatedly add the best of the top-k remaining single heads while the score rises. Writes "
            '{"heads": [[layer, head], ...], ...} for HeadPerturbation(heads=FILE) / --control heads heads=FILE.'
        ),
        epilog=(
            f"Built-in scorers (offline pixel-statistics proxies, not learned quality measures): "
            f"{', '.join(sorted(SCORERS))}. Your own: --scorer package.module:function, a function "
            "f(images, prompts) -> list of floats, higher is better (docs/head-search.md)."
        ),
    )
    s.add_argument("--model", "-m", default=None, help=f"{models} (default: tiny-sd)")
    s.add_argument(
        "--prompts", required=True, metavar="FILE", help="text file, one prompt per line (blank lines skipped)"
    )
    s.add_argument(
        "--seeds", type=positive_int, default=2, metavar="N", help="score each prompt on seeds 0..N-1 (default: 2)"
    )
    s.add_argument("--rounds", type=positive_int, default=3, metavar="R", help="most heads to pick (default: 3)")
    s.add_argument(
        "--top-k",
        type=positive_int,
        default=4,
        metavar="K",
        help="best remaining single heads tried in each round after the first (default: 4)",
    )
    s.add_argument("--scorer", required=True, metavar="NAME", help="built-in scorer name or package.module:function")
    s.add_argument(
        "--candidates",
        default="self",
        metavar="SELECTOR",
        help="layer selector for the candidate layers, several separated by ';' "
        "(e.g. 'mid;up_blocks.1'); self-attention parts only (default: self)",
    )
    s.add_argument(
        "--scale", type=positive_float, default=3.0, metavar="S", help="perturbation guidance scale (default: 3)"
    )
    s.add_argument("--softness", type=_softness, default=1.0, metavar="U", help="SoftPAG u in (0, 1] (default: 1)")
    s.add_argument(
        "--kind",
        choices=("identity", "uniform"),
        default="identity",
        help="perturbed map: I or uniform (default: identity)",
    )
    s.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="denoising steps per image (default: 4 for embedded tiny models, else the pipeline's)",
    )
    s.add_argument("--guidance", type=float_arg, default=None, help="CFG scale (default: the pipeline's)")
    s.add_argument("--height", type=positive_int, default=None, help="image height in pixels")
    s.add_argument("--width", type=positive_int, default=None, help="image width in pixels")
    s.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    s.add_argument(
        "--cache", default=None, metavar="DIR", help="cache evaluations here; a rerun resumes without regenerating"
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("-o", "--output", default="heads.json", metavar="PATH", help="output JSON (default: heads.json)")
    s.set_defaults(func=_cmd_heads_search)


def _cmd_heads_missing(args: argparse.Namespace) -> int:
    raise UsageError(f"choose an action: search (see '{PROG} heads --help')")


def _cmd_heads_search(args: argparse.Namespace) -> int:
    from attnctrl.models.loading import model_key
    from attnctrl.models.tiny import TINY_MODELS
    from attnctrl.pipelines.head_search import candidate_heads, search_heads
    from attnctrl.scorers import get_scorer
    from attnctrl.selectors import Selector

    prompts = read_prompts(args.prompts)
    get_scorer(args.scorer)  # unknown name / unimportable path: fail before loading a model
    selectors = [part.strip() for part in args.candidates.split(";")]
    for part in selectors:
        Selector.parse(part)
    candidates = selectors[0] if len(selectors) == 1 else selectors
    if args.cache is not None and Path(args.cache).exists() and not Path(args.cache).is_dir():
        raise CLIError(f"cache {args.cache!r} is not a directory")
    out = Path(args.output)
    outputs = common.Outputs([out], suffix=".json", why="HeadPerturbation(heads=...) reads .json files")
    say = print  # launched on several processes (accelerate launch, torchrun): rank 0 reports and writes
    try:
        state = procs.state()
        if not state.is_main_process:
            outputs.discard()
            say = lambda *a, **k: None
        model = model_key(args.model)
        pipe = common.load_model(args.model)
        if state.num_processes > 1 and state.device.type != "cpu":  # launched: each process on its GPU
            pipe = pipe.to(state.device)
        steps = args.steps if args.steps is not None else (4 if model in TINY_MODELS else None)
        kw: dict[str, Any] = {}
        for key, value in (
            ("guidance_scale", args.guidance),
            ("height", args.height),
            ("width", args.width),
            ("negative_prompt", args.negative),
        ):
            if value is not None:
                kw[key] = value
        cands = candidate_heads(pipe, candidates, args.height, args.width)
        seeds = list(range(args.seeds))
        n_layers = len({layer for layer, _ in cands})
        say(
            f"{model} ({pipe.family}): {len(cands)} candidate heads in {n_layers} layer{'s' * (n_layers != 1)}; "
            f"{len(prompts)} prompt{'s' * (len(prompts) != 1)} x {len(seeds)} seed{'s' * (len(seeds) != 1)}; "
            f"scorer {args.scorer}",
            flush=True,
        )
        result = search_heads(
            pipe,
            prompts,
            seeds,
            args.scorer,
            rounds=args.rounds,
            top_k=args.top_k,
            candidates=candidates,
            scale=args.scale,
            softness=args.softness,
            kind=args.kind,
            steps=steps,
            cache_dir=args.cache,
            progress=not args.no_progress,
            model_id=model,
            spread=procs.spreader(state),
            **kw,
        )
        if result.baseline is not None:
            say(f"baseline (no perturbation)  {result.baseline:.6g}")
        for entry in result.history:
            tried = len(entry["tried"])
            if entry["picked"] is not None:
                layer, head = entry["picked"]
                say(f"round {entry['round']}  + {layer} head {head}  {entry['score']:.6g}  ({tried} tried)")
            else:
                say(f"round {entry['round']}  no addition improves {entry['score']:.6g} ({tried} tried): stop")
        cached = f", {result.cached} read from {result.cache_file}" if result.cached else ""
        by = f" by process 0 of {state.num_processes}" if state.num_processes > 1 else ""
        say(
            f"{result.generated} head sets evaluated{by}{cached}; {len(result.heads)} "
            f"head{'s' * (len(result.heads) != 1)}, score {result.score:.6g}"
        )
        if state.is_main_process:
            result.to_json(outputs.temps[0])
            outputs.commit()
    finally:
        outputs.discard()
    say(out)
    return 0
