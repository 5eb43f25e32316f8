"""Attend-and-Excite: attnctrl's `ac.AttendExcite` against diffusers' `StableDiffusionAttendAndExcitePipeline`.

Same model, prompt, token indices, seed, steps, thresholds and maps resolution, in ONE process,
alternating run by run after a warm-up round (the harness, bench/harness.py):

    diffusers  StableDiffusionAttendAndExcitePipeline(**pipe.components)(prompt, token_indices=..., attn_res=(16, 16))
    attnctrl   ControlledPipeline(pipe)(prompt, controls=[ac.AttendExcite(tokens=..., resolution=16)])

Prints median / min seconds, the ratio attnctrl / diffusers (target <= 1.0), peak memory per
variant (target ratio <= 1.0) and the max abs difference of the final latents (expected <= 1e-4).

    python bench/attend_excite.py --model tiny-sd
    python bench/attend_excite.py --model sd15-random --steps 5 --repeats 2
"""

from __future__ import annotations

import argparse
import warnings

import harness  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads (bench/ is on sys.path as a script)

PROMPT = "a cat and a frog"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(ap, model="sd15-random", steps=5, repeats=2, output_type="latent")
    ap.add_argument("--thresholds", default="0:0.05,10:0.5,20:0.8", help="refinement step:peak pairs ('' for none)")
    args = harness.parse_args(ap, argv)

    from diffusers import StableDiffusionAttendAndExcitePipeline

    import attnctrl as ac
    from attnctrl.controls.attention_loss import parse_thresholds
    from attnctrl.tokens import resolve

    pipe, cp, build_s = harness.load_pipeline(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        ref = StableDiffusionAttendAndExcitePipeline(**parts, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    indices = [resolve(pipe.tokenizer, PROMPT, w)[0] for w in ("cat", "frog")]
    thresholds = parse_thresholds(args.thresholds, {})
    harness.header(
        "Attend-and-Excite: attnctrl vs diffusers StableDiffusionAttendAndExcitePipeline",
        "bench/attend_excite.py",
        args,
        pipe,
        build_s,
        f"prompt {PROMPT!r}, token indices {indices}, thresholds {thresholds}, maps 16x16",
    )

    kw = harness.pipe_kwargs(args)
    res = harness.compare(
        {
            "diffusers": harness.timed_call(
                lambda gen, keep: ref(
                    PROMPT,
                    token_indices=indices,
                    generator=gen,
                    attn_res=(16, 16),
                    thresholds=thresholds,
                    max_iter_to_alter=25,
                    callback=keep.legacy,
                    callback_steps=1,
                    **kw,
                ),
                args,
            ),
            "attnctrl": harness.timed_call(
                lambda gen, keep: cp(
                    PROMPT,
                    generator=gen,
                    callback_on_step_end=keep,
                    **kw,
                    controls=[ac.AttendExcite(tokens=indices, resolution=16, steps=(0, 25), thresholds=thresholds)],
                ),
                args,
            ),
        },
        args,
    )
    harness.report(res, args, ref="diffusers")
    harness.target("attnctrl/diffusers (time, medians)", res.ratio("attnctrl", "diffusers"), 1.0)
    harness.target("attnctrl/diffusers (peak memory, medians)", res.peak_ratio("attnctrl", "diffusers"), 1.0)
    diff = harness._maxdiff(res.first["attnctrl"].latents, res.first["diffusers"].latents)
    harness.target("max|Δlatent| attnctrl vs diffusers", diff, 1e-4, ".3g")
    return harness.finish()


if __name__ == "__main__":
    raise SystemExit(main())
