"""PAG: attnctrl's `ac.PAG` against diffusers' own `StableDiffusionPAGPipeline` on the same model.

Times two variants on the same model, prompt, seed, steps, guidance and size, in ONE process,
alternating run by run after a warm-up round:

    diffusers  StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=L)(..., pag_scale=s)
    attnctrl   ControlledPipeline(pipe)(..., controls=[ac.PAG(layers=L, scale=s)])   (target: ratio <= 1.0)

and prints median / min seconds, the ratio attnctrl / diffusers, peak memory per variant, and the
max abs difference of the final latents and images between the two (expected <= 1e-5).

    python bench/pag.py --model tiny-sd
    python bench/pag.py --model sd15-random --repeats 3 --steps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# overhead sets OMP_WAIT_POLICY=PASSIVE before torch loads (see there); import it first
from overhead import PROMPT, _as_array, _load, _maxdiff  # noqa: E402  (bench/ is on sys.path)

import torch  # noqa: E402
from memory import PeakMemory  # noqa: E402
from models import build  # noqa: E402

VARIANTS = ("diffusers", "attnctrl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny-sd", "sd15-random"), default="sd15-random")
    ap.add_argument("--layers", default="mid", help="pag_applied_layers, comma-separated (default: mid)")
    ap.add_argument("--pag-scale", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (tiny-sd), 10 (sd15-random)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs both variants)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="height = width in px (default: tiny-sd's own / 256)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output-type", choices=("pil", "latent"), default="pil", help="pil includes the VAE decode")
    ap.add_argument("--scheduler", choices=("pndm", "ddim"), default="pndm", help="sd15-random only")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    args = ap.parse_args(argv)
    args.steps = args.steps or (10 if args.model == "sd15-random" else 20)
    if args.size is None and args.model == "sd15-random":
        args.size = 256
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layers = args.layers.split(",") if "," in args.layers else args.layers

    import attnctrl as ac
    from attnctrl.pipelines import ControlledPipeline
    from diffusers import StableDiffusionPAGPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    pipe = build(args.model, args.scheduler).to(device)
    pipe.set_progress_bar_config(disable=True)
    cp = ControlledPipeline(pipe)
    pag_pipe = StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=layers)
    pag_pipe.set_progress_bar_config(disable=True)

    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, output_type=args.output_type)
    if args.size:
        kw.update(height=args.size, width=args.size)

    def run(variant: str) -> tuple[float, dict]:
        last = {}

        def keep_latents(_pipe, i, t, cb):
            last["latents"] = cb["latents"]
            return cb

        gen = torch.Generator("cpu").manual_seed(args.seed)
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        if variant == "diffusers":
            out = pag_pipe(PROMPT, generator=gen, pag_scale=args.pag_scale, callback_on_step_end=keep_latents, **kw)
        else:
            out = cp(PROMPT, generator=gen, controls=[ac.PAG(layers=layers, scale=args.pag_scale)],
                     callback_on_step_end=keep_latents, **kw)
        sync()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dt, {"images": _as_array(out.images), "latents": last["latents"].float().cpu(), "cpu_s": cpu}

    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print("== PAG: attnctrl vs diffusers StableDiffusionPAGPipeline (bench/pag.py) ==")
    print(f"model {args.model}: UNet {n_params:.0f}M params, {type(pipe.scheduler).__name__}, random weights; device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"layers {layers!r}, pag_scale {args.pag_scale}, guidance {args.guidance_scale}, steps {args.steps}, "
          f"size {args.size or 'model default'}, output_type {args.output_type}, seed {args.seed}")
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
            with mem.measure(m):  # every timed run (one RSS sample varies by ±30 MiB); gc / trim / reset precede the timer
                dt, res = run(v)
            times[v].append(dt)
            cpus[v].append(res["cpu_s"])
            peaks[v].append(m["peak_mib"])
            first.setdefault(v, res)
        print(f"  round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.3f} s {peaks[v][-1]:.0f} MiB" for v in VARIANTS))
        sys.stdout.flush()

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    mn = {v: min(times[v]) for v in VARIANTS}
    cmed = {v: statistics.median(cpus[v]) for v in VARIANTS}
    hdr = f"{'variant':<10} {'median s':>9} {'min s':>8} {'cpu s':>8} {'peak MiB (median, min-max)':>27}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for v in VARIANTS:
        pk = f"{statistics.median(peaks[v]):.1f} ({min(peaks[v]):.0f}-{max(peaks[v]):.0f})"
        print(f"{v:<10} {med[v]:9.3f} {mn[v]:8.3f} {cmed[v]:8.3f} {pk:>27}")
    print("-" * len(hdr))
    ratio = med["attnctrl"] / med["diffusers"]
    print(f"ratio attnctrl/diffusers: median {ratio:.3f}, min {mn['attnctrl'] / mn['diffusers']:.3f}, "
          f"cpu {cmed['attnctrl'] / cmed['diffusers']:.3f}  ({args.repeats} timed runs each)")
    spread = {v: max(times[v]) / min(times[v]) for v in VARIANTS}
    if max(spread.values()) > 1.25:
        print("WARNING: noisy timings (max/min: " + ", ".join(f"{v} {s:.2f}" for v, s in spread.items())
              + "); trust the min and cpu ratios more")
    a, d = first["attnctrl"], first["diffusers"]
    dl, di = _maxdiff(a["latents"], d["latents"]), _maxdiff(a["images"], d["images"])
    what = "PIL pixels scaled to [0, 1]" if args.output_type == "pil" else "output latents"
    print(f"max|Δlatent| {dl:.3g} (final latents), max|Δimage| {di:.3g} ({what}); "
          f"{'OK' if dl <= 1e-5 else 'OVER'} vs 1e-5 on latents")
    gen = torch.Generator("cpu").manual_seed(args.seed)
    stock = pipe(PROMPT, generator=gen, **{**kw, "output_type": "latent"}).images.float().cpu()  # untimed, no PAG
    print(f"PAG's own effect (so a small Δ is not vacuous): max|Δlatent| diffusers PAG vs stock without PAG "
          f"{_maxdiff(d['latents'], stock):.3g}; latents std {d['latents'].std():.3f}")
    print(f"peak memory, every timed run: {mem.method}")
    print(f"target attnctrl/diffusers <= 1.00: {ratio:.3f} {'OK' if ratio <= 1.0 else 'OVER'}; load average after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
