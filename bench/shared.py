"""SharedAttention (StyleAligned): time and peak memory against the stock pipeline on a batch of prompts.

Times, in ONE process, alternating run by run after a warm-up round, on the same model, prompts,
seed, steps, guidance and size:

    stock    pipe(prompts, ...)                                              (plain diffusers, no control)
    shared   ControlledPipeline(pipe)(prompts, controls=[ac.SharedAttention(...)])

and prints median / min seconds, CPU seconds, peak memory per variant and the ratios shared/stock,
plus the max |Δ| of the reference row's final latents between the two (expected <= 1e-5: the
reference attends only to itself). Self-attention of the targets sees twice the keys, so its cost
roughly doubles; the rest of the UNet is unchanged.

    python bench/shared.py                                   # sd15-random, 256 px, 4 prompts
    python bench/shared.py --steps 5 --repeats 3 --shared-norms
"""
# ruff: noqa: I001, RUF100  (overhead must be imported before torch)
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# overhead sets OMP_WAIT_POLICY=PASSIVE before torch loads (see there); import it first
from overhead import _load, _maxdiff  # noqa: E402  (bench/ is on sys.path)

import torch  # noqa: E402
from memory import PeakMemory  # noqa: E402
from models import build  # noqa: E402

VARIANTS = ("stock", "shared")
PROMPTS = [
    "a toy train. macro photo. 3d game asset",
    "a toy airplane. macro photo. 3d game asset",
    "a toy bicycle. macro photo. 3d game asset",
    "a toy car. macro photo. 3d game asset",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny-sd", "sd15-random"), default="sd15-random")
    ap.add_argument("--batch", type=int, default=4, help="number of prompts (one image each; default 4)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both variants)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="height = width in px (default: 256 for sd15-random)")
    ap.add_argument("--score-shift", type=float, default=0.0)
    ap.add_argument("--shared-norms", action="store_true", help="also share GroupNorm statistics")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output-type", choices=("pil", "latent"), default="latent", help="pil includes the VAE decode")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    args = ap.parse_args(argv)
    if args.size is None and args.model == "sd15-random":
        args.size = 256
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]

    import attnctrl as ac
    from attnctrl.pipelines import ControlledPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    pipe = build(args.model, "ddim").to(device)
    pipe.set_progress_bar_config(disable=True)
    cp = ControlledPipeline(pipe)
    kw = {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "output_type": args.output_type}
    if args.size:
        kw.update(height=args.size, width=args.size)

    def run(variant: str) -> tuple[float, float, torch.Tensor]:
        last = {}

        def keep_latents(_pipe, i, t, cb):
            last["latents"] = cb["latents"]
            return cb

        gen = torch.Generator("cpu").manual_seed(args.seed)
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        if variant == "stock":
            pipe(prompts, generator=gen, callback_on_step_end=keep_latents, **kw)
        else:
            control = ac.SharedAttention(score_shift=args.score_shift, shared_norms=args.shared_norms)
            cp(prompts, generator=gen, controls=[control], callback_on_step_end=keep_latents, **kw)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, last["latents"].float().cpu()

    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print("== SharedAttention (StyleAligned) vs stock diffusers (bench/shared.py) ==")
    print(f"model {args.model}: UNet {n_params:.0f}M params, {type(pipe.scheduler).__name__}, random weights; device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {args.batch} prompts, steps {args.steps}, guidance {args.guidance_scale} (CFG: {2 * args.batch} UNet rows), "
          f"size {args.size or 'model default'}, score_shift {args.score_shift}, shared_norms {args.shared_norms}, "
          f"output_type {args.output_type}")
    print(f"rounds: {args.warmup} warm-up + {args.repeats} timed ({' -> '.join(VARIANTS)}); load average before: {_load()}")
    sys.stdout.flush()

    for _ in range(args.warmup):
        for v in VARIANTS:
            run(v)
    times, cpus, peaks, first = {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}, {v: [] for v in VARIANTS}, {}
    mem = PeakMemory(device)
    for r in range(args.repeats):
        for v in VARIANTS:
            m = {}
            with mem.measure(m):
                dt, cpu, lat = run(v)
            times[v].append(dt)
            cpus[v].append(cpu)
            peaks[v].append(m["peak_mib"])
            first.setdefault(v, lat)
        print(f"  round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f} s {peaks[v][-1]:.0f} MiB" for v in VARIANTS))
        sys.stdout.flush()

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    mn = {v: min(times[v]) for v in VARIANTS}
    cmed = {v: statistics.median(cpus[v]) for v in VARIANTS}
    pk = {v: statistics.median(peaks[v]) for v in VARIANTS}
    hdr = f"{'variant':<8} {'median s':>9} {'min s':>8} {'cpu s':>8} {'peak MiB (median, min-max)':>27}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for v in VARIANTS:
        spread = f"{pk[v]:.1f} ({min(peaks[v]):.0f}-{max(peaks[v]):.0f})"
        print(f"{v:<8} {med[v]:9.3f} {mn[v]:8.3f} {cmed[v]:8.3f} {spread:>27}")
    print("-" * len(hdr))
    print(f"ratio shared/stock: time median {med['shared'] / med['stock']:.3f}, min {mn['shared'] / mn['stock']:.3f}, "
          f"cpu {cmed['shared'] / cmed['stock']:.3f}; peak memory {pk['shared'] / pk['stock']:.3f} "
          f"(+{pk['shared'] - pk['stock']:.0f} MiB)")
    s, b = first["shared"], first["stock"]
    print(f"reference row max|Δlatent| vs stock {_maxdiff(s[:1], b[:1]):.3g} (expected <= 1e-5); "
          f"targets max|Δlatent| {_maxdiff(s[1:], b[1:]):.3g} (the style sharing itself)")
    print(f"peak memory, every timed run: {mem.method}; load average after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
