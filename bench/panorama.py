"""Panorama benchmark on the Shapes world: how many objects, and how many duplicates, does a wide
canvas get with plain wide generation, MultiDiffusion (Bar-Tal et al. 2023) and MAD (Quattrini et
al. 2024)?

Each seed's start noise is shared by the three methods (one image per seed, batched):

    plain           the stock model run on the whole wide latent (no views; --circular does not apply)
    multidiffusion  ac.Panorama("multidiffusion"): views of the model's 16×16 latents, merged each step
    mad             ac.Panorama("mad"): the same views, attention merged over the canvas (switch 0.5)

Every panorama is scored by the Shapes detector (`attnctrl.shapes.detect`) on the whole image:
objects found, the named ones ("red circle", "blue square") and others, duplicates (named objects
beyond the first of each), the share with both named objects present and with exactly one each.
Prints a markdown table and, with ``--out DIR``, writes each method's panoramas as a strip.

    python bench/panorama.py                         # Shapes, 64×256 px, 12 seeds, 25 steps: ~3 min on 2 cores
    python bench/panorama.py --width 384 --seeds 8 --stride 8 --circular
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see overhead.py: spinning OpenMP threads on a shared machine

import numpy as np
import torch
from PIL import Image

METHODS = ("plain", "multidiffusion", "mad")
PROMPT = "a red circle and a blue square"


def named(prompt: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs named in the prompt (`attnctrl.shapes.detect.named_objects`)."""
    from attnctrl.shapes.detect import named_objects

    return named_objects(prompt)[0]


def score(image: Image.Image, wanted: list[tuple[str, str]]) -> dict:
    """Counts of one panorama: objects, each named object, others, duplicates, present, exact."""
    from attnctrl.shapes.detect import detect

    found = detect(image)
    per = [sum(1 for o in found if (o.color, o.shape) == w) for w in wanted]
    return {
        "objects": len(found),
        **{f"{c} {s}": n for (c, s), n in zip(wanted, per)},
        "other": len(found) - sum(per),
        "duplicates": sum(max(0, n - 1) for n in per),
        "present": float(all(n > 0 for n in per)),
        "exact": float(all(n == 1 for n in per)),
    }


def run(pipe, method: str, args, seeds: list[int]) -> tuple[list[Image.Image], float]:
    import attnctrl as ac

    controls = []
    if method != "plain":
        controls = [ac.Panorama(method, view=args.view, stride=args.stride, circular=args.circular)]
    t0 = time.perf_counter()
    out = pipe(
        PROMPT,
        controls=controls,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        num_images_per_prompt=len(seeds),
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
    )
    return out.images, (time.perf_counter() - t0) / len(seeds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="shapes", help="embedded model (default: shapes)")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=12, help="seeds 0..N-1 (default 12)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--view", type=int, default=None, help="view side in latents (default: the model's, 16)")
    ap.add_argument("--stride", type=int, default=None, help="latents between views (default view // 4)")
    ap.add_argument("--circular", action="store_true", help="360° panoramas (views wrap around)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, metavar="DIR", help="write METHOD.png strips of the panoramas here")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)

    import attnctrl as ac

    pipe = ac.load(args.model)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    wanted = named(PROMPT)
    print(f"# bench/panorama.py — {args.model}, {PROMPT!r}, {args.height}×{args.width} px, {args.steps} steps")
    print(f"# seeds 0..{args.seeds - 1}; view {args.view or 'native'}, stride {args.stride or 'view // 4'}, ", end="")
    print(f"circular {args.circular}; torch {torch.__version__}, {platform.machine()}, {args.threads} threads\n")
    keys = ["objects", *(f"{c} {s}" for c, s in wanted), "other", "duplicates", "present", "exact"]
    print("| method | " + " | ".join(keys) + " | s / image |")
    print("|---" * (len(keys) + 2) + "|")
    per_seed = {}
    for method in methods:
        images, secs = run(pipe, method, args, seeds)
        scores = [score(im, wanted) for im in images]
        per_seed[method] = [s["duplicates"] for s in scores]
        means = [np.mean([s[k] for s in scores]) for k in keys]
        print(f"| {method} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {secs:.1f} |", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            strip = Image.new("RGB", (images[0].width, images[0].height * len(images)), "white")
            for i, im in enumerate(images):
                strip.paste(im, (0, i * im.height))
            strip.save(Path(args.out) / f"{method}.png")
    print("\nduplicates per seed (same start noise per column; mean ± standard error):")
    for method, d in per_seed.items():
        sem = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"  {method:>14}: {' '.join(str(x) for x in d)}   {np.mean(d):.2f} ± {sem:.2f}")
    print("\nobjects, named, other, duplicates: mean per panorama; present / exact: share of panoramas with")
    print("each named object at least once / exactly once (duplicates: named objects beyond the first of each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
