"""Compositional benchmark on the Shapes world: do the attention controls fix missing objects and
swapped colours?

Runs a fixed set of two- and three-object prompts (with spatial relations) × seeds on the Shapes
model, without control and with each compositional control that is registered in
`attnctrl.controls.registry.CONTROLS` (others are skipped with a note):

    none           no control
    attend-excite  AttendExcite(tokens=<shape words>)
    astar          AStar(tokens=<shape words>)
    conform        Conform(groups=[[colour, shape], ...])
    structured     StructuredGuidance(phrases=["colour shape", ...])
    modulation     AttentionModulation(groups=[[colour, shape], ...])

Each control's arguments come from the prompt's objects, for the parameters its constructor has
(`tokens`, `groups`, `phrases`); ``--set NAME key=value ...`` adds or overrides constructor
arguments as on the command line. Every image is scored by the rule-based detector
(`attnctrl.shapes.detect`): presence (every named object found), objects (share of named objects
found), binding (found shapes carry their named colours), count (as many objects as named),
relation (for relation prompts) and seconds per image. Prints a markdown table and writes to
``--out``: ``grid.png`` (rows = methods, columns = prompt × seed; green frame: presence, binding
and count all right) and ``results.json`` (figures, per-image detections and scores).

    python bench/compositional.py                                   # Shapes model, 12 prompts x 4 seeds
    python bench/compositional.py --model tiny-sd --prompts 3 --seeds 1 --steps 4   # dry run, random weights
    python bench/compositional.py --methods none,conform --set conform temperature=0.3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see overhead.py: spinning OpenMP threads on a shared machine

import numpy as np
import torch
from PIL import Image, ImageDraw

PROMPTS = (
    # two objects
    "a red circle and a blue square",
    "a green triangle and a yellow circle",
    "a purple square and a green circle",
    "a blue triangle and a red square",
    # three objects
    "a red circle, a green square and a blue triangle",
    "a yellow square, a purple circle and a red triangle",
    "a blue circle, a yellow triangle and a green square",
    "a purple triangle, a red square and a yellow circle",
    # spatial relations
    "a blue triangle to the left of a yellow circle",
    "a red square above a green circle",
    "a purple circle to the right of a blue square",
    "a yellow triangle below a red circle",
)
#: The compositional controls, by registry name, in table order.
METHODS = ("attend-excite", "astar", "conform", "structured", "modulation")
METRICS = ("presence", "presence_rate", "binding", "count", "relation")


# --------------------------------------------------------------------------------- arguments


def object_refs(prompt: str) -> list[tuple[str, str]]:
    """``[(colour word, shape word), ...]`` of the objects the prompt names, as token references of
    `attnctrl.tokens` (``"circle#2"`` for a word's second occurrence)."""
    from attnctrl.shapes.data import COLORS, SHAPES, SIZES
    from attnctrl.tokens import prompt_words

    words = [w.lower() for w in prompt_words(prompt)]
    seen: Counter = Counter()
    occ = []
    for w in words:
        seen[w] += 1
        occ.append(seen[w])

    def ref(i: int) -> str:
        return words[i] if occ[i] == 1 else f"{words[i]}#{occ[i]}"

    refs = []
    for i, w in enumerate(words):
        if w not in SHAPES:
            continue
        j = i - 1 if i > 0 and words[i - 1] not in SIZES else i - 2
        if j >= 0 and words[j] in COLORS:
            refs.append((ref(j), ref(i)))
    return refs


def control_kwargs(cls, prompt: str, extra: dict | None = None) -> dict:
    """Constructor arguments of control class `cls` for `prompt`, from its objects, plus `extra`."""
    from attnctrl.controls.registry import control_params

    names = {p["name"] for p in control_params(cls)}
    refs = object_refs(prompt)
    kw: dict = {}
    if "tokens" in names:
        kw["tokens"] = [shape for _, shape in refs]
    if "groups" in names:
        kw["groups"] = [[colour, shape] for colour, shape in refs]
    if "phrases" in names:
        kw["phrases"] = [f"{colour.split('#')[0]} {shape.split('#')[0]}" for colour, shape in refs]
    return {**kw, **(extra or {})}


def _prompts(spec: str | None) -> list[str]:
    if spec is None:
        return list(PROMPTS)
    if spec.strip().isdigit():
        n = int(spec)
        if not 1 <= n <= len(PROMPTS):
            raise SystemExit(f"--prompts {n}: choose 1..{len(PROMPTS)} of the built-in prompts")
        # spread over the three kinds: two-object, three-object and relation prompts alternate
        order = [PROMPTS[k + 4 * g] for k in range(4) for g in range(3)]
        return order[:n]
    path = Path(spec)
    lines = path.read_text().splitlines() if path.is_file() else spec.split(";")
    prompts = [p.strip() for p in lines if p.strip() and not p.lstrip().startswith("#")]
    if not prompts:
        raise SystemExit(f"--prompts {spec!r}: no prompts")
    return prompts


def _seeds(spec: str) -> list[int]:
    try:
        if "," in spec:
            return [int(s) for s in spec.split(",") if s.strip()]
        return list(range(int(spec)))
    except ValueError:
        raise SystemExit(f"--seeds {spec!r}: a count (4 → seeds 0..3) or a comma-separated list (0,5,7)") from None


def _methods(spec: str | None, registered: dict) -> tuple[list[str], list[str]]:
    """(methods to run, notes on skipped ones)."""
    wanted = ["none", *METHODS] if spec is None else [m.strip().lower() for m in spec.split(",") if m.strip()]
    run, notes = [], []
    for m in wanted:
        if m == "none" or m in registered:
            if m not in run:
                run.append(m)
        elif m in METHODS:
            notes.append(f"{m}: not registered in attnctrl.controls.registry.CONTROLS, skipped")
        else:
            raise SystemExit(
                f"--methods: unknown method {m!r}; choose from none, {', '.join(METHODS)}"
                f" (or another registered control: {', '.join(sorted(registered))})"
            )
    return run, notes


def _overrides(items: list[list[str]], registered: dict) -> dict[str, dict]:
    from attnctrl.controls.registry import parse_kwargs

    out: dict[str, dict] = {}
    for name, *kv in items or []:
        name = name.lower()
        if name not in registered:
            raise SystemExit(f"--set {name}: not a registered control ({', '.join(sorted(registered))})")
        out.setdefault(name, {}).update(parse_kwargs(registered[name], kv, name=name))
    return out


# --------------------------------------------------------------------------------------- runs


def _cell(image: Image.Image, ok: bool | None, scale: int) -> Image.Image:
    size = (image.width * scale, image.height * scale)
    img = image.convert("RGB").resize(size, Image.NEAREST)
    frame = Image.new(
        "RGB", (size[0] + 4, size[1] + 4), {True: (40, 170, 60), False: (220, 40, 40), None: (160, 160, 160)}[ok]
    )
    frame.paste(img, (2, 2))
    return frame


def write_grid(path: Path, rows: dict[str, list], columns: list[str], scale: int) -> None:
    """PNG: one row per method (label on the left), one column per prompt × seed."""
    cells = [c for r in rows.values() for c in r if c is not None]
    w, h = (cells[0].width, cells[0].height) if cells else (68, 68)
    label_w, head_h = 110, 14
    grid = Image.new("RGB", (label_w + w * len(columns), head_h + h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for j, col in enumerate(columns):
        draw.text((label_w + j * w + 2, 1), col, fill=(0, 0, 0))
    for i, (method, row) in enumerate(rows.items()):
        draw.text((2, head_h + i * h + h // 2 - 5), method, fill=(0, 0, 0))
        for j, cell in enumerate(row):
            if cell is not None:
                grid.paste(cell, (label_w + j * w, head_h + i * h))
    grid.save(path)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        default="shapes",
        help="shapes (default; the trained Shapes model), tiny-sd for a dry run, or any ac.load() name",
    )
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own, 25 for shapes)")
    ap.add_argument("--seeds", default="4", help="a count (4: seeds 0..3, default) or a comma-separated list")
    ap.add_argument(
        "--prompts",
        default=None,
        help=f"N: the first N of the {len(PROMPTS)} built-in prompts (mixing two-object, three-object and relation ones); "
        "a file with one prompt per line; or prompts separated by ';' (default: all built-in)",
    )
    ap.add_argument(
        "--methods", default=None, help=f"comma-separated, default: none,{','.join(METHODS)} (those registered)"
    )
    ap.add_argument(
        "--set",
        nargs="+",
        action="append",
        metavar=("NAME", "KEY=VALUE"),
        default=[],
        help="extra constructor arguments for one control, e.g. --set modulation temperature=0.7 (repeatable)",
    )
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the model's own (5.0 for shapes)")
    ap.add_argument("--out", default="bench/out/compositional", help="folder for grid.png and results.json")
    ap.add_argument("--grid-scale", type=int, default=2, help="pixel upscaling of the images in the grid (default 2)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    args = ap.parse_args(argv)

    from diffusers.utils import logging as dlog

    import attnctrl as ac
    from attnctrl.controls.registry import CONTROLS
    from attnctrl.shapes.detect import aggregate, detect, score

    dlog.set_verbosity_error()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    prompts, seeds = _prompts(args.prompts), _seeds(args.seeds)
    methods, notes = _methods(args.methods, CONTROLS)
    extra = _overrides(args.set, CONTROLS)
    for p in prompts:
        if not object_refs(p):
            raise SystemExit(f"prompt {p!r} names no '<colour> <shape>' object of the Shapes world")

    t0 = time.perf_counter()
    try:
        pipe = ac.load(args.model)
    except Exception as err:  # (e.g. the Shapes model not trained or registered yet)
        raise SystemExit(
            f"cannot load model {args.model!r}: {err}\n(for a dry run without the Shapes model: --model tiny-sd)"
        ) from None
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    call = {}
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        call["guidance_scale"] = args.guidance_scale
    defaults = {**getattr(pipe, "defaults", {}), **call}

    command = (
        shlex.join([Path(sys.executable).name, *sys.argv])
        if argv is None
        else shlex.join(["bench/compositional.py", *argv])
    )
    print("== attnctrl compositional benchmark (bench/compositional.py) ==")
    print(f"command: {command}")
    print(
        f"model {args.model} ({type(pipe.pipe).__name__}, loaded in {load_s:.1f} s), device {args.device} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}), torch {torch.__version__}"
    )
    print(
        f"steps {defaults.get('num_inference_steps', 'pipeline default')}, guidance {defaults.get('guidance_scale', 'pipeline default')}, "
        f"seeds {seeds}, {len(prompts)} prompts x {len(seeds)} seeds = {len(prompts) * len(seeds)} images per method"
    )
    print(f"methods: {', '.join(methods)}")
    for note in notes:
        print(f"  note: {note}")
    for m in methods:
        if m != "none":
            print(
                f"  {m}: {CONTROLS[m].__name__}(**{control_kwargs(CONTROLS[m], prompts[0], extra.get(m))})  [for prompt 0]"
            )
    for i, p in enumerate(prompts):
        print(f"  p{i}: {p}")
    sys.stdout.flush()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = [f"p{i} s{s}" for i in range(len(prompts)) for s in seeds]
    rows: dict[str, list] = {}
    summary: dict[str, dict] = {}
    records = []
    for m in methods:
        cells, scores, secs, error = [], [], [], None
        for i, prompt in enumerate(prompts):
            for seed in seeds:
                if error is not None:
                    cells.append(None)
                    continue
                controls = [] if m == "none" else [CONTROLS[m](**control_kwargs(CONTROLS[m], prompt, extra.get(m)))]
                t = time.perf_counter()
                try:
                    image = pipe(prompt, seed=seed, controls=controls, **call).images[0]
                except Exception as err:  # (a control still being written: report it, go on)
                    error = f"{type(err).__name__}: {err}"
                    print(f"  {m}: failed on p{i} seed {seed}: {error}; method skipped")
                    cells.append(None)
                    continue
                secs.append(time.perf_counter() - t)
                found = detect(image)
                s = score(prompt, found)
                scores.append(s)
                cells.append(_cell(image, s["presence"] and s["binding"] and s["count"], args.grid_scale))
                records.append(
                    {
                        "method": m,
                        "prompt": i,
                        "seed": seed,
                        "seconds": round(secs[-1], 4),
                        "score": s,
                        "detected": [
                            {"shape": d.shape, "color": d.color, "box": list(d.box), "area": d.area} for d in found
                        ],
                    }
                )
        rows[m] = cells
        summary[m] = {**aggregate(scores), "s_per_img": float(np.mean(secs)) if secs else None, "error": error}
        done = summary[m]
        print(
            f"  {m}: {done['n']} images, presence {_fmt(done['presence'])}, binding {_fmt(done['binding'])}, "
            f"count {_fmt(done['count'])}, {_fmt(done['s_per_img'])} s/img"
        )
        sys.stdout.flush()

    print()
    print("| method | presence | objects | binding | count | relation | s/img |")
    print("|---|---|---|---|---|---|---|")
    for m, r in summary.items():
        if r["error"] is not None and not r["n"]:
            print(f"| {m} | failed: {r['error'][:80]} | | | | | |")
            continue
        print(
            f"| {m} | {_fmt(r['presence'])} | {_fmt(r['presence_rate'])} | {_fmt(r['binding'])} | {_fmt(r['count'])} "
            f"| {_fmt(r['relation'])} | {_fmt(r['s_per_img'])} |"
        )
    print(
        f"\npresence: share of images with every named (colour, shape); objects: share of named objects found; "
        f"binding: share of images whose found shapes all carry their named colour (and at least one is found); "
        f"count: as many objects as named; relation: box centres in the named relation (relation prompts only). "
        f"Scored by attnctrl.shapes.detect; {len(prompts)} prompts x {len(seeds)} seeds per method."
    )

    write_grid(out_dir / "grid.png", rows, columns, args.grid_scale)
    result = {
        "command": command,
        "model": args.model,
        "device": args.device,
        "steps": defaults.get("num_inference_steps"),
        "guidance_scale": defaults.get("guidance_scale"),
        "seeds": seeds,
        "prompts": prompts,
        "methods": methods,
        "notes": notes,
        "overrides": extra,
        "summary": summary,
        "images": records,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(
        f"wrote {out_dir / 'grid.png'} (rows: {', '.join(rows)}; columns: prompt x seed) and {out_dir / 'results.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
