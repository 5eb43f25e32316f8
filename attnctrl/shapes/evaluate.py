"""Score the Shapes model with the detector: ``python -m attnctrl.shapes.evaluate --samples 200``.

Prompts are captions of random scenes (:func:`attnctrl.shapes.data.random_scene`, fixed seed) with
1, 2 and 3 objects (and two-object captions with a spatial relation). Each image, one seed per
prompt, is scored by :func:`attnctrl.shapes.detect.score`: *correct* (single object: the named
colour-shape is found), *presence* (every named object found), *binding* (found shapes carry their
named colours), *count* and *relation*.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .data import random_scene
from .detect import aggregate, detect, score

__all__ = ["evaluate", "generate", "main", "prompts"]


def prompts(n: int, n_objects: int, seed: int = 1234, relation: bool = False) -> list[str]:
    """``n`` captions of random scenes with ``n_objects`` objects (with a relation if asked)."""
    rng = np.random.default_rng([seed, n_objects, int(relation)])
    if relation:
        from .data import RELATIONS

        return [random_scene(rng, 2, RELATIONS[int(rng.integers(4))]).caption for _ in range(n)]
    return [random_scene(rng, n_objects, None).caption for _ in range(n)]


def generate(pipe, texts: list[str], seed: int = 0, batch: int = 25, steps: int = 25, guidance: float = 5.0):
    """One image per prompt; prompt ``i`` uses a CPU generator seeded ``seed + i``."""
    images = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        with torch.inference_mode():
            out = pipe(
                chunk,
                generator=gens,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=64,
                width=64,
                output_type="pil",
            )
        images.extend(out.images)
    return images


def evaluate(pipe, samples: int = 200, multi: int | None = None, **kw) -> dict:
    """Detector scores per category: ``{"1 object": {...}, "2 objects": ..., "3 objects": ..., "relation": ...}``."""
    multi = samples // 2 if multi is None else multi
    cats = {
        "1 object": prompts(samples, 1),
        "2 objects": prompts(multi, 2),
        "3 objects": prompts(multi, 3),
        "relation": prompts(multi, 2, relation=True),
    }
    results = {}
    for name, texts in cats.items():
        if not texts:
            continue
        images = generate(pipe, texts, **kw)
        scores = [score(t, detect(im)) for t, im in zip(texts, images)]
        agg = aggregate(scores)
        if name == "1 object":
            agg["correct"] = agg["presence"]
            agg["exact"] = float(np.mean([s["presence"] and s["count"] for s in scores]))
        results[name] = agg
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m attnctrl.shapes.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=200, help="single-object prompts")
    parser.add_argument("--multi", type=int, default=None, help="prompts per multi-object category (default samples/2)")
    parser.add_argument("--model", default=None, help="saved Shapes pipeline folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .model import load_shapes_pipeline

    pipe = load_shapes_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    res = evaluate(
        pipe, args.samples, args.multi, seed=args.seed, batch=args.batch, steps=args.steps, guidance=args.guidance
    )
    print(
        f"{'category':<10} {'n':>4} {'correct':>8} {'presence':>9} {'obj.rate':>9} {'binding':>8} {'count':>6} {'relation':>9}"
    )
    for name, a in res.items():

        def f(k, a=a):
            return "-" if a.get(k) is None else f"{a[k]:.3f}"

        print(
            f"{name:<10} {a['n']:>4} {f('correct'):>8} {f('presence'):>9} {f('presence_rate'):>9} "
            f"{f('binding'):>8} {f('count'):>6} {f('relation'):>9}"
        )
    print(f"({args.steps} steps, guidance {args.guidance}, {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": res}, fh, indent=2)


if __name__ == "__main__":
    main()
