"""Overhead of attnctrl over the stock diffusers pipeline (DESIGN.md, "Performance rules").

Times three variants on the same model, prompt, seed, steps and size, in ONE process, alternating
run by run after a warm-up round (stock, controlled, maps, stock, controlled, maps, ...):

    stock       the diffusers pipeline's own ``__call__``
    controlled  ``ControlledPipeline(pipe)(..., controls=[])``  (target: median ratio <= 1.03)
    maps        ``... controls=[AttentionMaps(resolutions=[16])]``  (16x16 maps only; target <= 1.15)

and prints median / min seconds, ratios to stock (of medians and of mins), peak memory per variant
and the max abs difference of each variant's images and final latents from stock's (all three
must produce the same pixels: controls here only observe).

Models (random weights; nothing is downloaded):
    tiny-sd      attnctrl's embedded tiny SD pipeline (64x64 px by default)
    sd15-random  the real SD 1.5 architecture (UNet 320/640/1280/1280, CLIP-L-sized text encoder,
                 SD VAE) with random weights, our offline CLIP tokenizer, PNDM (or DDIM), 256x256 px

    python bench/overhead.py --model tiny-sd
    python bench/overhead.py --model sd15-random --repeats 3 --steps 5
    python bench/overhead.py --model sd15-random --steps 2 --repeats 1 --output-type latent --profile   # where time goes
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

# Must be set before torch loads OpenMP. With the default (spinning) wait policy, 2+ torch threads on
# a machine shared with other busy processes make run times vary 10x; PASSIVE makes them usable.
# Override with OMP_WAIT_POLICY=ACTIVE in the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from memory import PeakMemory  # noqa: E402  (bench/ is on sys.path when run as a script)
from models import build  # noqa: E402

VARIANTS = ("stock", "controlled", "maps")
PROMPT = "a red car and a white sheep"


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def _as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        return images.astype(np.float64)
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])  # PIL -> [0, 1]


class Breakdown:
    """Wall time spent inside the text encoder, UNet and VAE decoder forwards, and inside the attention
    modules that `AttentionMaps(resolutions=[16])` reads (part of the UNet time), via forward hooks."""

    PARTS = ("text_encoder", "unet", "vae_decoder", "maps_layers")

    def __init__(self, cp, args, device):
        from attnctrl import AttentionMaps
        from attnctrl.plan import build_plan

        pipe = cp.pipe
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.acc = dict.fromkeys(self.PARTS, 0.0)
        self._t0 = {}
        grid = cp.default_grid(args.height, args.width)
        self.maps_layers = sorted(build_plan([AttentionMaps(resolutions=[16])], cp.layers(), grid))
        modules = [("text_encoder", pipe.text_encoder), ("unet", pipe.unet), ("vae_decoder", pipe.vae.decoder)]
        modules += [("maps_layers", pipe.unet.get_submodule(n)) for n in self.maps_layers]
        for name, module in modules:
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))

    def _pre(self, name):
        def hook(_m, _a):
            self.sync()
            self._t0[name] = time.perf_counter()
        return hook

    def _post(self, name):
        def hook(_m, _a, _o):
            self.sync()
            self.acc[name] += time.perf_counter() - self._t0.pop(name)
        return hook

    def take(self) -> dict:
        out, self.acc = self.acc, dict.fromkeys(self.PARTS, 0.0)
        return out


def make_runner(pipe, cp, args, device, breakdown: Breakdown | None = None):
    from attnctrl import AttentionMaps

    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, output_type=args.output_type)
    if args.height:
        kw.update(height=args.height, width=args.width)

    def run(variant: str) -> tuple[float, dict]:
        """One timed call; returns (wall seconds, {"images": array, "latents": tensor, "cpu_s": process CPU s, ...})."""
        last = {}

        def keep_latents(_pipe, i, t, cb):
            last["latents"] = cb["latents"]  # the scheduler returns a new tensor every step
            return cb

        gen = torch.Generator("cpu").manual_seed(args.seed)  # same as ControlledPipeline's seed=
        if device.type == "cuda":
            torch.cuda.synchronize()
        c0, t0 = time.process_time(), time.perf_counter()
        if variant == "stock":
            out = pipe(args.prompt, generator=gen, callback_on_step_end=keep_latents, **kw)
        else:
            controls = [AttentionMaps(resolutions=[16])] if variant == "maps" else []
            out = cp(args.prompt, generator=gen, controls=controls, callback_on_step_end=keep_latents, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        res = {"images": _as_array(out.images), "latents": last["latents"].float().cpu(), "cpu_s": cpu}
        if breakdown is not None:
            res["parts"] = breakdown.take()
        if variant == "maps":
            res["maps"] = {k: tuple(v.shape) for k, v in out.maps.by_res.items()}
        return dt, res

    return run


def _maxdiff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _load() -> str:
    with contextlib.suppress(OSError):
        return "%.2f %.2f %.2f" % os.getloadavg()
    return "n/a"


# ---------------------------------------------------------------------------------------------
# profiling of the maps path
# ---------------------------------------------------------------------------------------------
def _bench(fn, n: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def micro_maps(cp, args, device, dtype) -> None:
    """Cost of the maps path per layer call on the real shapes, vs the SDPA every variant runs."""
    from attnctrl import AttentionMaps
    from attnctrl.attention import AttentionCall, _sdpa, attention_probs
    from attnctrl.plan import build_plan
    from attnctrl.state import BatchLayout, RunContext, StepState

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    grid = cp.default_grid(args.height, args.width)
    maps = AttentionMaps(resolutions=[16])
    plan = build_plan([maps], cp.layers(), grid)
    layers = {li.name: li for li in cp.layers() if li.name in plan}
    cfg = args.guidance_scale > 1
    run = RunContext(family=cp.family, layout=BatchLayout.build(1, cfg), grid=grid, state=StepState(0, 999.0, 1))
    text_len = 77
    g = torch.Generator("cpu").manual_seed(0)
    print(f"\n-- maps path per layer call, real shapes (batch {run.layout.size}, {text_len} text tokens), mean of 20 calls:")
    total = {"sdpa": 0.0, "probs": 0.0, "maps": 0.0}
    for name, li in sorted(layers.items()):
        attn = cp.pipe.unet.get_submodule(name)
        h, w = li.grid(grid)
        inner = attn.to_q.out_features
        d = inner // attn.heads

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        q = rnd(run.layout.size, attn.heads, h * w, d)
        k, v = rnd(run.layout.size, attn.heads, text_len, d), rnd(run.layout.size, attn.heads, text_len, d)
        call = AttentionCall(layer=li, run=run, q=q, k=k, v=v, q_image=slice(0, h * w), k_image=slice(0, 0),
                             k_text=slice(0, text_len), grid=(h, w), scale=attn.scale)
        maps.begin(run)
        with torch.inference_mode():
            p = attention_probs(q, k, attn.scale, None)
            t_sdpa = _bench(lambda: _sdpa(call, None), 20, sync)
            t_probs = _bench(lambda: attention_probs(q, k, attn.scale, None), 20, sync)
            t_maps = _bench(lambda: maps.probs(call, p), 20, sync)
        maps.end(run)
        total["sdpa"] += t_sdpa
        total["probs"] += t_probs
        total["maps"] += t_maps
        print(f"   {name:<52} q {tuple(q.shape)}: SDPA {t_sdpa * 1e3:7.3f} ms, attention_probs {t_probs * 1e3:7.3f} ms, "
              f"AttentionMaps.probs {t_maps * 1e3:7.3f} ms")
    extra = total["probs"] + total["maps"]
    print(f"   per UNet forward ({len(layers)} layers): extra work of the maps path {extra * 1e3:.2f} ms "
          f"(attention_probs {total['probs'] * 1e3:.2f} + AttentionMaps.probs {total['maps'] * 1e3:.2f}); "
          f"SDPA of the same layers {total['sdpa'] * 1e3:.2f} ms (runs in every variant)")


def profile_maps(run, args) -> None:
    """cProfile one run of each variant (attention-related functions), then torch.profiler ops of stock and maps."""
    import cProfile
    import pstats

    print("\n== profile (cProfile; absolute times inflated by the profiler, compare rows) ==")
    interesting = ("attention.py", "maps.py", "unet.py", "attention_processor.py", "loop.py", "controlled.py")
    for variant in ("stock", "controlled", "maps"):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        run(variant)
        prof.disable()
        total = time.perf_counter() - t0
        st = pstats.Stats(prof)
        print(f"\n-- {variant}: {total:.3f} s under cProfile; attention-related functions (cumulative s, calls):")
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():
            if any(file.endswith(x) for x in interesting):
                rows.append((ct, nc, tt, f"{os.path.basename(file)}:{line}({fn})"))
        for ct, nc, tt, name in sorted(rows, reverse=True)[:14]:
            print(f"   {ct:8.3f} cum  {tt:8.3f} self  {nc:7d} calls  {name}")

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() and args.device == "cuda" else [])
    for variant in ("stock", "maps"):
        with profile(activities=acts, record_shapes=True) as prof:
            run(variant)
        print(f"\n-- torch.profiler, {variant}: top ops by self CPU time (input shapes grouped)")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40, max_shapes_column_width=60))


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny-sd", "sd15-random"), default="tiny-sd")
    ap.add_argument("--steps", type=int, default=None, help="default: 20 (tiny-sd), 10 (sd15-random)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs all three variants)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--height", type=int, default=None, help="default: model default (tiny-sd 64) / 256 (sd15-random)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--output-type", choices=("pil", "latent"), default="pil", help="pil includes the VAE decode (default)")
    ap.add_argument("--scheduler", choices=("pndm", "ddim"), default="pndm", help="sd15-random only (tiny-sd has its own DDIM)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--memory", choices=("last-round", "extra-round", "off"), default="last-round",
                    help="measure peak memory during the last timed round (default; the per-run reset is outside the timer), "
                         "in one extra untimed round, or not at all")
    ap.add_argument("--order", choices=("fixed", "rotate"), default="fixed",
                    help="fixed: every round runs stock, controlled, maps; rotate: round r starts r places later "
                         "(stock-controlled-maps, controlled-maps-stock, maps-stock-controlled, ...) so no variant "
                         "always runs in the same position")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the text encoder / UNet / VAE decoder forwards per variant (forward hooks on all variants)")
    ap.add_argument("--profile", action="store_true", help="profile the maps path after the benchmark")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 10 if args.model == "sd15-random" else 20
    if args.model == "sd15-random" and args.height is None and args.width is None:
        args.height = args.width = 256
    if (args.height is None) != (args.width is None):
        args.height = args.height or args.width
        args.width = args.width or args.height
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    from attnctrl.pipelines import ControlledPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    t0 = time.perf_counter()
    pipe = build(args.model, args.scheduler).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    cp = ControlledPipeline(pipe)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    size = f"{args.height}x{args.width}" if args.height else "model default"
    print("== attnctrl overhead benchmark (bench/overhead.py) ==")
    print(f"model {args.model}: UNet {n_params:.0f}M params, scheduler {type(pipe.scheduler).__name__}, built in {build_s:.1f} s (random weights)")
    print(f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), dtype {args.dtype}, "
          f"torch {torch.__version__}, torch.set_num_threads({threads}) -> get_num_threads() = {torch.get_num_threads()}, "
          f"interop threads {torch.get_num_interop_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"prompt {args.prompt!r}, seed {args.seed}, steps {args.steps}, guidance {args.guidance_scale}, size {size}, "
          f"output_type {args.output_type} ({'VAE decode included' if args.output_type == 'pil' else 'no VAE decode'})")
    print(f"rounds: {args.warmup} warm-up + {args.repeats} timed, each round runs {' -> '.join(VARIANTS)}"
          f"{' (rotated by one each round)' if args.order == 'rotate' else ''}; "
          f"load average before: {_load()}")
    sys.stdout.flush()

    run = make_runner(pipe, cp, args, device, Breakdown(cp, args, device) if args.breakdown else None)
    for _ in range(args.warmup):
        for v in VARIANTS:
            run(v)
    times = {v: [] for v in VARIANTS}
    cpus = {v: [] for v in VARIANTS}
    first, noise = {}, {v: 0.0 for v in VARIANTS}
    parts = {v: [] for v in VARIANTS}
    mem = PeakMemory(device)
    peaks = {}

    def timed(v: str, measure: bool):
        if not measure:
            return run(v)
        out = {}
        with mem.measure(out):  # gc / trim / reset happen before the timer starts
            dt, res = run(v)
        peaks[v] = out["peak_mib"]
        return dt, res

    for r in range(args.repeats):
        line = []
        shift = r % len(VARIANTS) if args.order == "rotate" else 0
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            dt, res = timed(v, args.memory == "last-round" and r == args.repeats - 1)
            times[v].append(dt)
            cpus[v].append(res["cpu_s"])
            if "parts" in res:
                bd = res["parts"]
                parts[v].append({**bd, "rest": dt - bd["text_encoder"] - bd["unet"] - bd["vae_decoder"]})
            line.append(f"{v} {dt:.3f}")
            if v not in first:
                first[v] = res
            else:  # run-to-run nondeterminism of the same variant (noise floor of the equality check)
                noise[v] = max(noise[v], _maxdiff(res["images"], first[v]["images"]))
        print(f"  round {r + 1}: " + ", ".join(line) + " s" + ("  (memory measured)" if args.memory == "last-round" and r == args.repeats - 1 else ""))
        sys.stdout.flush()
    if args.memory == "extra-round":
        for v in VARIANTS:
            timed(v, True)

    med = {v: statistics.median(times[v]) for v in VARIANTS}
    mn = {v: min(times[v]) for v in VARIANTS}
    ref = first["stock"]
    print()
    cmed = {v: statistics.median(cpus[v]) for v in VARIANTS}
    hdr = (f"{'variant':<11} {'median s':>9} {'min s':>8} {'ratio med':>9} {'ratio min':>9} {'cpu s':>8} {'ratio cpu':>9} "
           f"{'peak MiB':>9} {'max|Δimage|':>12} {'max|Δlatent|':>13}")
    print(hdr)
    print("-" * len(hdr))
    for v in VARIANTS:
        pk = f"{peaks[v]:9.1f}" if v in peaks else f"{'-':>9}"
        di = _maxdiff(first[v]["images"], ref["images"])
        dl = _maxdiff(first[v]["latents"], ref["latents"])
        print(f"{v:<11} {med[v]:9.3f} {mn[v]:8.3f} {med[v] / med['stock']:9.3f} {mn[v] / mn['stock']:9.3f} "
              f"{cmed[v]:8.3f} {cmed[v] / cmed['stock']:9.3f} {pk} {di:12.3g} {dl:13.3g}")
    print("-" * len(hdr))
    print(f"ratio = variant / stock on medians of wall time ('ratio med'), on minimums ('ratio min') and on medians of "
          f"process CPU time, all threads ('cpu s', 'ratio cpu'); {args.repeats} timed runs each")
    spread = {v: max(times[v]) / min(times[v]) for v in VARIANTS}
    if max(spread.values()) > 1.25:
        print("WARNING: noisy timings (max/min per variant: " + ", ".join(f"{v} {spread[v]:.2f}" for v in VARIANTS)
              + "); trust 'ratio min' and 'ratio cpu' more than 'ratio med', or rerun with more --repeats / on an idle machine")
    print(f"max|Δimage| / max|Δlatent|: each variant's timed round-1 output vs stock's ({'PIL pixels scaled to [0, 1]' if args.output_type == 'pil' else 'output latents'}"
          f" / final latents before decoding); same variant across rounds, max|Δimage|: "
          + ", ".join(f"{v} {noise[v]:.3g}" for v in VARIANTS))
    if args.breakdown:
        print("breakdown, median s per run: text_encoder / unet / vae_decoder forwards, maps_layers = inside the "
              "attention modules AttentionMaps(resolutions=[16]) reads (part of unet), rest = run time outside the three forwards:")
        for v in VARIANTS:
            cols = [f"{k} {statistics.median(p[k] for p in parts[v]):.3f}" for k in (*Breakdown.PARTS, "rest")]
            print(f"  {v:<11} " + ", ".join(cols))
    img, lat = ref["images"], ref["latents"].numpy()
    print(f"stock output (so a zero Δ is not vacuous): images {img.shape} mean {img.mean():.3f} std {img.std():.3f}, "
          f"latents std {lat.std():.3f}, all finite: {bool(np.isfinite(img).all() and np.isfinite(lat).all())}")
    print(f"maps recorded: {first['maps']['maps']} (images, tokens, h, w)")
    if peaks:
        where = "the last timed round" if args.memory == "last-round" else "one extra untimed round"
        print(f"peak memory: {mem.method}; measured in {where}")
    for v, target in (("controlled", 1.03), ("maps", 1.15)):
        r = med[v] / med["stock"]
        print(f"target {v}/stock <= {target:.2f}: {r:.3f} {'OK' if r <= target else 'OVER'}")
    print(f"load average after: {_load()} (other processes on this machine skew timings; ratios of alternated runs are what to compare)")
    sys.stdout.flush()

    if args.profile:
        micro_maps(cp, args, device, dtype)
        profile_maps(run, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
