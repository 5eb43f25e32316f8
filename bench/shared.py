"""SharedAttention (StyleAligned): time and peak memory against the stock pipeline on a batch of prompts.

Times, in ONE process, alternating run by run after a warm-up round, on the same model, prompts,
seed, steps, guidance and size (the harness, bench/harness.py):

    stock    pipe(prompts, ...)                                              (plain diffusers, no control)
    shared   ControlledPipeline(pipe)(prompts, controls=[ac.SharedAttention(...)])

and prints median / min seconds, CPU seconds, peak memory per variant and the ratios shared/stock,
plus the max |Δ| of the reference row's final latents between the two (expected <= 1e-5: the
reference attends only to itself). Self-attention of the targets sees twice the keys, so its cost
roughly doubles; the rest of the UNet is unchanged.

    python bench/shared.py                                   # sd15-random, 256 px, 4 prompts
    python bench/shared.py --steps 5 --repeats 3 --shared-norms
"""

from __future__ import annotations

import argparse

import harness  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads (bench/ is on sys.path as a script)

PROMPTS = [
    "a toy train. macro photo. 3d game asset",
    "a toy airplane. macro photo. 3d game asset",
    "a toy bicycle. macro photo. 3d game asset",
    "a toy car. macro photo. 3d game asset",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(ap, model="sd15-random", steps=5, repeats=3, output_type="latent", scheduler="ddim")
    ap.add_argument("--batch", type=int, default=4, help="number of prompts (one image each; default 4)")
    ap.add_argument("--score-shift", type=float, default=0.0)
    ap.add_argument("--shared-norms", action="store_true", help="also share GroupNorm statistics")
    args = harness.parse_args(ap, argv)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]

    import attnctrl as ac

    pipe, cp, build_s = harness.load_pipeline(args)
    harness.header(
        "SharedAttention (StyleAligned) vs stock diffusers",
        "bench/shared.py",
        args,
        pipe,
        build_s,
        f"batch {args.batch} prompts (CFG: {2 * args.batch} UNet rows), score_shift {args.score_shift}, "
        f"shared_norms {args.shared_norms}",
    )

    kw = harness.pipe_kwargs(args)
    res = harness.compare(
        {
            "stock": harness.timed_call(
                lambda gen, keep: pipe(prompts, generator=gen, callback_on_step_end=keep, **kw), args
            ),
            "shared": harness.timed_call(
                lambda gen, keep: cp(
                    prompts,
                    generator=gen,
                    callback_on_step_end=keep,
                    **kw,
                    controls=[ac.SharedAttention(score_shift=args.score_shift, shared_norms=args.shared_norms)],
                ),
                args,
            ),
        },
        args,
    )
    harness.report(res, args, ref="stock")
    s, b = res.first["shared"].latents, res.first["stock"].latents
    harness.target("reference row max|Δlatent| vs stock", harness._maxdiff(s[:1], b[:1]), 1e-5, ".3g")
    print(f"targets max|Δlatent| vs stock {harness._maxdiff(s[1:], b[1:]):.3g} (the style sharing itself)")
    return harness.finish()


if __name__ == "__main__":
    raise SystemExit(main())
