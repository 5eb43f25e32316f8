"""Attend-and-Excite: attnctrl's `ac.AttendExcite` against diffusers' `StableDiffusionAttendAndExcitePipeline`.

Same model, prompt, token indices, seed, steps, thresholds and maps resolution, in ONE process,
alternating run by run after a warm-up round:

    diffusers  StableDiffusionAttendAndExcitePipeline(**pipe.components)(prompt, token_indices=..., attn_res=(16, 16))
    attnctrl   ControlledPipeline(pipe)(prompt, controls=[ac.AttendExcite(tokens=..., resolution=16)])

Prints median / min seconds, the ratio attnctrl / diffusers (target <= 1.0), peak memory per
variant (target ratio <= 1.0) and the max abs difference of the final latents (expected <= 1e-4).

    python bench/attend_excite.py --model tiny-sd
    python bench/attend_excite.py --model sd15-random --steps 5 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

# overhead sets OMP_WAIT_POLICY=PASSIVE before torch loads (see there); import it first
from overhead import _load, _maxdiff  # noqa: E402  (bench/ is on sys.path)

import torch  # noqa: E402
from memory import PeakMemory  # noqa: E402
from models import build  # noqa: E402

VARIANTS = ("diffusers", "attnctrl")
PROMPT = "a cat and a frog"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny-sd", "sd15-random"), default="sd15-random")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="timed rounds (each runs both variants)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--size", type=int, default=None, help="height = width in px (default: 256 for sd15-random)")
    ap.add_argument("--thresholds", default="0:0.05,10:0.5,20:0.8", help="refinement step:peak pairs ('' for none)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.size is None and args.model == "sd15-random":
        args.size = 256
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    import attnctrl as ac
    from attnctrl.controls.attention_loss import parse_thresholds
    from attnctrl.pipelines import ControlledPipeline
    from attnctrl.tokens import resolve
    from diffusers import StableDiffusionAttendAndExcitePipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    pipe = build(args.model, "pndm").to(device)
    pipe.set_progress_bar_config(disable=True)
    cp = ControlledPipeline(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
        ref = StableDiffusionAttendAndExcitePipeline(**parts, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    indices = [resolve(pipe.tokenizer, PROMPT, w)[0] for w in ("cat", "frog")]
    thresholds = parse_thresholds(args.thresholds, {})
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent")
    if args.size:
        kw.update(height=args.size, width=args.size)

    def run(variant: str):
        gen = torch.Generator("cpu").manual_seed(args.seed)
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        if variant == "diffusers":
            out = ref(PROMPT, token_indices=indices, generator=gen, attn_res=(16, 16), thresholds=thresholds,
                      max_iter_to_alter=25, **kw)
        else:
            control = ac.AttendExcite(tokens=indices, resolution=16, steps=(0, 25), thresholds=thresholds)
            out = cp(PROMPT, generator=gen, controls=[control], **kw)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0, out.images.float().cpu()

    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print("== Attend-and-Excite: attnctrl vs diffusers StableDiffusionAttendAndExcitePipeline (bench/attend_excite.py) ==")
    print(f"model {args.model}: UNet {n_params:.0f}M params, {type(pipe.scheduler).__name__}, random weights; device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"prompt {PROMPT!r}, token indices {indices}, thresholds {thresholds}, steps {args.steps}, "
          f"size {args.size or 'model default'}, maps 16x16, seed {args.seed}")
    print(f"rounds: {args.warmup} warm-up + {args.repeats} timed ({' -> '.join(VARIANTS)}); load average before: {_load()}")
    sys.stdout.flush()
    for _ in range(args.warmup):
        for v in VARIANTS:
            run(v)
    times, cpus, peaks = ({v: [] for v in VARIANTS} for _ in range(3))
    last = {}
    mem = PeakMemory(device)
    for r in range(args.repeats):
        for v in VARIANTS:
            m = {}
            with mem.measure(m):
                dt, cpu, latents = run(v)
            times[v].append(dt)
            cpus[v].append(cpu)
            peaks[v].append(m["peak_mib"])
            last[v] = latents
        print(f"  round {r + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f} s {peaks[v][-1]:.0f} MiB" for v in VARIANTS))
        sys.stdout.flush()

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    pk = {v: statistics.median(peaks[v]) for v in VARIANTS}
    hdr = f"{'variant':<10} {'median s':>9} {'min s':>8} {'cpu s':>8} {'peak MiB':>9}"
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for v in VARIANTS:
        print(f"{v:<10} {med[v]:9.2f} {min(times[v]):8.2f} {statistics.median(cpus[v]):8.2f} {pk[v]:9.1f}")
    print("-" * len(hdr))
    t_ratio, m_ratio = med["attnctrl"] / med["diffusers"], pk["attnctrl"] / max(pk["diffusers"], 1e-9)
    print(f"time ratio attnctrl/diffusers: median {t_ratio:.3f}, min {min(times['attnctrl']) / min(times['diffusers']):.3f} "
          f"({'OK' if t_ratio <= 1.0 else 'OVER'} vs 1.0)")
    print(f"peak-memory ratio attnctrl/diffusers: {m_ratio:.3f} ({'OK' if m_ratio <= 1.0 else 'OVER'} vs 1.0); {mem.method}")
    diff = _maxdiff(last["attnctrl"], last["diffusers"])
    print(f"max|Δlatent| {diff:.3g} ({'OK' if diff <= 1e-4 else 'OVER'} vs 1e-4); load average after: {_load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
