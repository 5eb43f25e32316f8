"""PAG: attnctrl's `ac.PAG` against diffusers' own `StableDiffusionPAGPipeline` on the same model.

Times two variants on the same model, prompt, seed, steps, guidance and size, in ONE process,
alternating run by run after a warm-up round (the harness, bench/harness.py):

    diffusers  StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=L)(..., pag_scale=s)
    attnctrl   ControlledPipeline(pipe)(..., controls=[ac.PAG(layers=L, scale=s)])   (target: ratio <= 1.0)

and prints median / min seconds, the ratio attnctrl / diffusers, peak memory per variant, and the
max abs difference of the final latents and images between the two (expected <= 1e-5), and how far
PAG moves the latents from a run without PAG.

    python bench/pag.py --model tiny-sd
    python bench/pag.py --model sd15-random --repeats 3 --steps 5
"""

from __future__ import annotations

import argparse

import harness  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads (bench/ is on sys.path as a script)
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(ap, model="sd15-random")
    ap.add_argument("--layers", default="mid", help="pag_applied_layers, comma-separated (default: mid)")
    ap.add_argument("--pag-scale", type=float, default=3.0)
    args = harness.parse_args(ap, argv)
    layers = args.layers.split(",") if "," in args.layers else args.layers

    from diffusers import StableDiffusionPAGPipeline

    import attnctrl as ac

    pipe, cp, build_s = harness.load_pipeline(args)
    pag_pipe = StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=layers)
    pag_pipe.set_progress_bar_config(disable=True)
    harness.header(
        "PAG: attnctrl vs diffusers StableDiffusionPAGPipeline",
        "bench/pag.py",
        args,
        pipe,
        build_s,
        f"prompt {harness.PROMPT!r}, layers {layers!r}, pag_scale {args.pag_scale}",
    )

    kw = harness.pipe_kwargs(args)
    prompt = harness.PROMPT
    res = harness.compare(
        {
            "diffusers": harness.timed_call(
                lambda gen, keep: pag_pipe(
                    prompt, generator=gen, pag_scale=args.pag_scale, callback_on_step_end=keep, **kw
                ),
                args,
            ),
            "attnctrl": harness.timed_call(
                lambda gen, keep: cp(
                    prompt,
                    generator=gen,
                    controls=[ac.PAG(layers=layers, scale=args.pag_scale)],
                    callback_on_step_end=keep,
                    **kw,
                ),
                args,
            ),
        },
        args,
    )
    harness.report(res, args, ref="diffusers")

    d = res.first["diffusers"]
    harness.target(
        "max|Δlatent| attnctrl vs diffusers", harness._maxdiff(res.first["attnctrl"].latents, d.latents), 1e-5, ".3g"
    )
    gen = torch.Generator("cpu").manual_seed(args.seed)
    stock = pipe(prompt, generator=gen, **{**kw, "output_type": "latent"}).images.float().cpu()  # untimed, no PAG
    print(
        f"PAG's own effect (so a small Δ is not vacuous): max|Δlatent| diffusers PAG vs stock without PAG "
        f"{harness._maxdiff(d.latents, stock):.3g}; latents std {d.latents.std():.3f}"
    )
    harness.target("attnctrl/diffusers", res.ratio("attnctrl", "diffusers"), 1.0)
    return harness.finish()


if __name__ == "__main__":
    raise SystemExit(main())
