"""Overhead of attnctrl over the stock diffusers pipeline (DESIGN.md, "Performance rules").

Times three variants on the same model, prompt, seed, steps and size, in ONE process, alternating
run by run after a warm-up round (stock, controlled, maps, stock, controlled, maps, ...; the
harness, bench/harness.py):

    stock       the diffusers pipeline's own ``__call__``
    controlled  ``ControlledPipeline(pipe)(..., controls=[])``  (target: median ratio <= 1.03)
    maps        ``... controls=[AttentionMaps(resolutions=[16])]``  (16x16 maps only; target <= 1.15)

and prints median / min seconds, ratios to stock (of medians, of mins and of CPU time), peak memory
per variant and the max abs difference of each variant's images and final latents from stock's (all
three must produce the same pixels: controls here only observe).

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
import os
import statistics
import time

import harness  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads (bench/ is on sys.path as a script)
import numpy as np
import torch

VARIANTS = ("stock", "controlled", "maps")


class Breakdown:
    """Wall time spent inside the text encoder, UNet and VAE decoder forwards, and inside the attention
    modules that `AttentionMaps(resolutions=[16])` reads (part of the UNet time), via forward hooks."""

    PARTS = ("text_encoder", "unet", "vae_decoder", "maps_layers")

    def __init__(self, cp, args, device):
        from attnctrl import AttentionMaps
        from attnctrl.plan import build_plan

        pipe = cp.pipe
        self.sync = harness.sync_fn(device)
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

    sync = harness.sync_fn(device)
    grid = cp.default_grid(args.height, args.width)
    maps = AttentionMaps(resolutions=[16])
    plan = build_plan([maps], cp.layers(), grid)
    layers = {li.name: li for li in cp.layers() if li.name in plan}
    cfg = args.guidance_scale > 1
    run = RunContext(family=cp.family, layout=BatchLayout.build(1, cfg), grid=grid, state=StepState(0, 999.0, 1))
    text_len = 77
    g = torch.Generator("cpu").manual_seed(0)
    print(
        f"\n-- maps path per layer call, real shapes (batch {run.layout.size}, {text_len} text tokens), mean of 20 calls:"
    )
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
        call = AttentionCall(
            layer=li,
            run=run,
            q=q,
            k=k,
            v=v,
            q_image=slice(0, h * w),
            k_image=slice(0, 0),
            k_text=slice(0, text_len),
            grid=(h, w),
            scale=attn.scale,
        )
        maps.begin(run)
        with torch.inference_mode():
            p = attention_probs(q, k, attn.scale, None)
            t_sdpa = _bench(lambda call=call: _sdpa(call, None), 20, sync)
            t_probs = _bench(lambda q=q, k=k, s=attn.scale: attention_probs(q, k, s, None), 20, sync)
            t_maps = _bench(lambda call=call, p=p: maps.probs(call, p), 20, sync)
        maps.end(run)
        total["sdpa"] += t_sdpa
        total["probs"] += t_probs
        total["maps"] += t_maps
        print(
            f"   {name:<52} q {tuple(q.shape)}: SDPA {t_sdpa * 1e3:7.3f} ms, attention_probs {t_probs * 1e3:7.3f} ms, "
            f"AttentionMaps.probs {t_maps * 1e3:7.3f} ms"
        )
    extra = total["probs"] + total["maps"]
    print(
        f"   per UNet forward ({len(layers)} layers): extra work of the maps path {extra * 1e3:.2f} ms "
        f"(attention_probs {total['probs'] * 1e3:.2f} + AttentionMaps.probs {total['maps'] * 1e3:.2f}); "
        f"SDPA of the same layers {total['sdpa'] * 1e3:.2f} ms (runs in every variant)"
    )


def profile_maps(variants, args) -> None:
    """cProfile one run of each variant (attention-related functions), then torch.profiler ops of stock and maps."""
    import cProfile
    import pstats

    print("\n== profile (cProfile; absolute times inflated by the profiler, compare rows) ==")
    interesting = ("attention.py", "maps.py", "unet.py", "attention_processor.py", "loop.py", "controlled.py")
    for variant in ("stock", "controlled", "maps"):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        variants[variant]()
        prof.disable()
        total = time.perf_counter() - t0
        st = pstats.Stats(prof)
        print(f"\n-- {variant}: {total:.3f} s under cProfile; attention-related functions (cumulative s, calls):")
        rows = []
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():
            if any(file.endswith(x) for x in interesting):
                rows.append((ct, nc, tt, f"{os.path.basename(file)}:{line}({fn})"))
        for ct, nc, tt, name in sorted(rows, reverse=True)[:14]:
            print(f"   {ct:8.3f} cum  {tt:8.3f} self  {nc:7d} calls  {name}")

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() and args.device == "cuda" else []
    )
    for variant in ("stock", "maps"):
        with profile(activities=acts, record_shapes=True) as prof:
            variants[variant]()
        print(f"\n-- torch.profiler, {variant}: top ops by self CPU time (input shapes grouped)")
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40, max_shapes_column_width=60
            )
        )


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    harness.add_common_args(ap, model="tiny-sd", memory="last-round")
    ap.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    ap.add_argument("--prompt", default=harness.PROMPT)
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the text encoder / UNet / VAE decoder forwards per variant (forward hooks on all variants)",
    )
    ap.add_argument("--profile", action="store_true", help="profile the maps path after the benchmark")
    args = harness.parse_args(ap, argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from attnctrl import AttentionMaps

    pipe, cp, build_s = harness.load_pipeline(args, dtype)
    harness.header("attnctrl overhead benchmark", "bench/overhead.py", args, pipe, build_s, f"prompt {args.prompt!r}")

    kw = harness.pipe_kwargs(args)
    breakdown = Breakdown(cp, args, device) if args.breakdown else None

    def variant(name: str):
        def call(gen, keep):
            if name == "stock":
                return pipe(args.prompt, generator=gen, callback_on_step_end=keep, **kw)
            controls = [AttentionMaps(resolutions=[16])] if name == "maps" else []
            return cp(args.prompt, generator=gen, controls=controls, callback_on_step_end=keep, **kw)

        timed = harness.timed_call(call, args)

        def run() -> harness.RunResult:
            res = timed()
            if breakdown is not None:
                res.extra["parts"] = breakdown.take()
            return res

        return run

    variants = {v: variant(v) for v in VARIANTS}
    res = harness.compare(variants, args)
    harness.report(res, args, ref="stock")
    if args.breakdown:
        print(
            "breakdown, median s per run: text_encoder / unet / vae_decoder forwards, maps_layers = inside the "
            "attention modules AttentionMaps(resolutions=[16]) reads (part of unet), rest = run time outside the three forwards:"
        )
        for v in VARIANTS:
            parts = [
                {**e["parts"], "rest": dt - e["parts"]["text_encoder"] - e["parts"]["unet"] - e["parts"]["vae_decoder"]}
                for dt, e in zip(res.times[v], res.extras[v])
            ]
            cols = [f"{k} {statistics.median(p[k] for p in parts):.3f}" for k in (*Breakdown.PARTS, "rest")]
            print(f"  {v:<11} " + ", ".join(cols))
    stock = res.first["stock"]
    img, lat = stock.images, stock.latents.numpy()
    print(
        f"stock output (so a zero Δ is not vacuous): images {img.shape} mean {img.mean():.3f} std {img.std():.3f}, "
        f"latents std {lat.std():.3f}, all finite: {bool(np.isfinite(img).all() and np.isfinite(lat).all())}"
    )
    maps = {k: tuple(m.shape) for k, m in res.first["maps"].output.maps.by_res.items()}
    print(f"maps recorded: {maps} (images, tokens, h, w)")
    for v, limit in (("controlled", 1.03), ("maps", 1.15)):
        harness.target(f"{v}/stock", res.ratio(v, "stock"), limit)
    harness.finish()

    if args.profile:
        micro_maps(cp, args, device, dtype)
        profile_maps(variants, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
