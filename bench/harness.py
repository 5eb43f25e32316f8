"""The harness the timing benchmarks share (overhead.py, pag.py, shared.py, attend_excite.py).

A benchmark builds one model, wraps each variant it compares in a ``Callable[[], RunResult]``
(usually with `timed_call`) and hands them to `compare`, which runs them in ONE process: warm-up
rounds first, then timed rounds that alternate the variants run by run, measuring peak memory
around the runs (`memory.PeakMemory`). `report` prints the results table (median / min / CPU
seconds, peak memory, max |Δ| of images and final latents against the reference variant), the
ratio lines, a warning on noisy timings and the equality noise floor; the script then prints its
own checks and ends with `finish` (the load average).

    import harness  # first: sets OMP_WAIT_POLICY=PASSIVE before torch loads

    ap = argparse.ArgumentParser(...)
    harness.add_common_args(ap, model="sd15-random")
    args = harness.parse_args(ap, argv)
    pipe, cp, build_s = harness.load_pipeline(args)
    harness.header("title", "bench/x.py", args, pipe, build_s, "settings line")
    res = harness.compare({"stock": harness.timed_call(lambda gen, keep: pipe(..., generator=gen,
                           callback_on_step_end=keep), args), ...}, args)
    harness.report(res, args)
    harness.finish()
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Must be set before torch loads OpenMP, so a benchmark imports this module before torch. With the
# default (spinning) wait policy, 2+ torch threads on a machine shared with other busy processes
# make run times vary 10x; PASSIVE makes them usable. Override with OMP_WAIT_POLICY=ACTIVE.
if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    warnings.warn("bench/harness.py imported after torch: OMP_WAIT_POLICY=PASSIVE may not take effect", stacklevel=2)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from memory import PeakMemory  # (bench/ is on sys.path when run as a script)
from models import build

PROMPT = "a red car and a white sheep"
MEMORY_MODES = ("every", "last-round", "extra-round", "off")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_array(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().numpy()
    if isinstance(images, np.ndarray):
        return images.astype(np.float64)
    return np.stack([np.asarray(im, dtype=np.float64) / 255.0 for im in images])  # PIL -> [0, 1]


def _maxdiff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("nan")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _load() -> str:
    with contextlib.suppress(OSError):
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return "n/a"


def sync_fn(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ---------------------------------------------------------------------------------------------
# command line, model, header
# ---------------------------------------------------------------------------------------------
def add_common_args(
    ap: argparse.ArgumentParser,
    *,
    model: str = "sd15-random",
    steps: int | None = None,
    repeats: int = 5,
    output_type: str = "pil",
    scheduler: str = "pndm",
    memory: str = "every",
) -> None:
    """The options every timing benchmark has; the keyword arguments are this script's defaults."""
    ap.add_argument("--model", choices=("tiny-sd", "sd15-random"), default=model)
    ap.add_argument(
        "--steps",
        type=int,
        default=steps,
        help=f"default: {steps}" if steps else "default: 20 (tiny-sd), 10 (sd15-random)",
    )
    ap.add_argument("--repeats", type=int, default=repeats, help="timed rounds (each runs every variant)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument(
        "--size", type=int, default=None, help="height = width in px (default: model default, 256 for sd15-random)"
    )
    ap.add_argument("--height", type=int, default=None, help="overrides --size (the other side follows if not given)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--output-type",
        choices=("pil", "latent"),
        default=output_type,
        help=f"pil includes the VAE decode (default: {output_type})",
    )
    ap.add_argument(
        "--scheduler",
        choices=("pndm", "ddim"),
        default=scheduler,
        help=f"sd15-random only; tiny-sd has its own DDIM (default: {scheduler})",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count())")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument(
        "--memory",
        choices=MEMORY_MODES,
        default=memory,
        help=f"peak memory: in every timed run, in the last timed round, in one extra untimed round, or not "
        f"at all (default: {memory}); the per-run reset happens outside the timer",
    )
    ap.add_argument(
        "--order",
        choices=("fixed", "rotate"),
        default="fixed",
        help="fixed: every round runs the variants in the same order; rotate: round r starts r places later, "
        "so no variant always runs in the same position",
    )


def parse_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, fill the model-dependent defaults (steps, size) and set the torch threads."""
    args = ap.parse_args(argv)
    if not args.steps:
        args.steps = 10 if args.model == "sd15-random" else 20
    h, w = args.height or args.size, args.width or args.size
    if h is None and w is None and args.model == "sd15-random":
        h = w = 256
    args.height, args.width = h or w, w or h
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    return args


def load_pipeline(args, dtype: torch.dtype | None = None):
    """(diffusers pipeline, ControlledPipeline over it, build seconds); random weights, progress bars off."""
    from diffusers.utils import logging as dlog

    from attnctrl.pipelines import ControlledPipeline

    dlog.set_verbosity_error()
    t0 = time.perf_counter()
    pipe = build(args.model, args.scheduler).to(torch.device(args.device), dtype)
    pipe.set_progress_bar_config(disable=True)
    cp = ControlledPipeline(pipe)
    return pipe, cp, time.perf_counter() - t0


def pipe_kwargs(args) -> dict:
    """Keyword arguments every variant passes to its pipeline call."""
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, output_type=args.output_type)
    if args.height:
        kw.update(height=args.height, width=args.width)
    return kw


def header(title: str, script: str, args, pipe, build_s: float, *lines: str) -> None:
    """Title, model, environment and common settings lines, then the script's own settings lines."""
    n_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    size = f"{args.height}x{args.width}" if args.height else "model default"
    print(f"== {title} ({script}) ==")
    print(
        f"model {args.model}: UNet {n_params:.0f}M params, scheduler {type(pipe.scheduler).__name__}, built in {build_s:.1f} s "
        f"(random weights)"
    )
    print(
        f"device {pipe.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
        f"dtype {str(pipe.unet.dtype).removeprefix('torch.')}, torch {torch.__version__}, "
        f"torch.set_num_threads({args.threads}) -> get_num_threads() = {torch.get_num_threads()}, interop threads {torch.get_num_interop_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(
        f"seed {args.seed}, steps {args.steps}, guidance {args.guidance_scale}, size {size}, output_type "
        f"{args.output_type} ({'VAE decode included' if args.output_type == 'pil' else 'no VAE decode'})"
    )
    for line in lines:
        print(line)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One timed pipeline call."""

    seconds: float  # wall time
    cpu_s: float  # process CPU time, all threads
    images: np.ndarray  # output: PIL pixels scaled to [0, 1], or the output latents
    latents: torch.Tensor | None  # final latents before decoding (float, CPU)
    output: Any = None  # the pipeline's output object
    extra: dict = field(default_factory=dict)  # whatever the script adds per run


class LatentKeeper:
    """Pipeline callbacks that keep the latest latents (the scheduler returns a new tensor every step)."""

    def __init__(self):
        self.latents = None

    def __call__(self, _pipe, i, t, cb):  # callback_on_step_end=
        self.latents = cb["latents"]
        return cb

    def legacy(self, i, t, latents):  # callback= (older pipelines), with callback_steps=1
        self.latents = latents


def timed_call(call: Callable[[torch.Generator, LatentKeeper], Any], args) -> Callable[[], RunResult]:
    """A variant: ``call(generator, keeper)`` runs the pipeline (passing ``callback_on_step_end=keeper``
    or ``callback=keeper.legacy``) with a fresh CPU generator seeded with ``args.seed`` (as
    ControlledPipeline's ``seed=``); the wall and CPU timers cover only the call, synchronised on CUDA."""
    sync = sync_fn(torch.device(args.device))

    def run() -> RunResult:
        keep = LatentKeeper()
        gen = torch.Generator("cpu").manual_seed(args.seed)
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = call(gen, keep)
        sync()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        latents = (
            keep.latents if keep.latents is not None else out.images if isinstance(out.images, torch.Tensor) else None
        )
        return RunResult(dt, cpu, _as_array(out.images), None if latents is None else latents.float().cpu(), out)

    return run


@dataclass
class Results:
    variants: tuple[str, ...]
    repeats: int
    memory_mode: str
    memory: PeakMemory
    times: dict[str, list[float]]
    cpus: dict[str, list[float]]
    peaks: dict[str, list[float]]  # MiB, the runs where memory was measured
    extras: dict[str, list[dict]]  # RunResult.extra of every timed run
    first: dict[str, RunResult]  # first timed run of each variant
    noise: dict[str, float]  # max|Δimage| between runs of the same variant

    def median(self, v: str) -> float:
        return statistics.median(self.times[v])

    def min(self, v: str) -> float:
        return min(self.times[v])

    def cpu(self, v: str) -> float:
        return statistics.median(self.cpus[v])

    def peak(self, v: str) -> float | None:
        return statistics.median(self.peaks[v]) if self.peaks[v] else None

    def ratio(self, v: str, ref: str) -> float:
        """Median wall time of v / ref's."""
        return self.median(v) / self.median(ref)

    def peak_ratio(self, v: str, ref: str) -> float | None:
        p, r = self.peak(v), self.peak(ref)
        return p / r if p is not None and r is not None and r > 0 else None


def compare(
    variants: dict[str, Callable[[], RunResult]],
    args=None,
    *,
    repeats: int | None = None,
    warmup: int | None = None,
    device: str | torch.device | None = None,
    memory: str | None = None,
    order: str | None = None,
) -> Results:
    """Warm-up rounds, then ``repeats`` timed rounds alternating the variants run by run; prints a line per round.

    The settings default to ``args`` (from `add_common_args`). ``memory``: ``every`` timed run (the
    median is reported: one RSS sample varies by tens of MiB), the ``last-round``, one ``extra-round``
    after the timed ones, or ``off``. ``order``: ``fixed`` or ``rotate`` (round r starts r places later).
    """
    repeats = repeats if repeats is not None else args.repeats
    warmup = warmup if warmup is not None else args.warmup
    memory = memory or args.memory
    order = order or args.order
    names = tuple(variants)
    mem = PeakMemory(torch.device(device or args.device))
    res = Results(
        names,
        repeats,
        memory,
        mem,
        *({v: [] for v in names} for _ in range(4)),
        first={},
        noise=dict.fromkeys(names, 0.0),
    )
    print(
        f"rounds: {warmup} warm-up + {repeats} timed, each round runs {' -> '.join(names)}"
        f"{' (rotated by one each round)' if order == 'rotate' else ''}; load average before: {_load()}"
    )
    sys.stdout.flush()

    def measured(v: str) -> RunResult:
        out = {}
        with mem.measure(out):  # gc / trim / reset happen before the timer starts
            r = variants[v]()
        res.peaks[v].append(out["peak_mib"])
        return r

    for _ in range(warmup):
        for v in names:
            variants[v]()
    for i in range(repeats):
        shift = i % len(names) if order == "rotate" else 0
        measure = memory == "every" or (memory == "last-round" and i == repeats - 1)
        line = []
        for v in names[shift:] + names[:shift]:
            r = measured(v) if measure else variants[v]()
            res.times[v].append(r.seconds)
            res.cpus[v].append(r.cpu_s)
            res.extras[v].append(r.extra)
            line.append(f"{v} {r.seconds:.3f} s" + (f" {res.peaks[v][-1]:.0f} MiB" if measure else ""))
            if v not in res.first:
                res.first[v] = r
            else:  # run-to-run nondeterminism of the same variant (noise floor of the equality check)
                res.noise[v] = max(res.noise[v], _maxdiff(r.images, res.first[v].images))
        print(f"  round {i + 1}: " + ", ".join(line))
        sys.stdout.flush()
    if memory == "extra-round":
        for v in names:
            measured(v)
    return res


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def report(res: Results, args, ref: str | None = None) -> None:
    """Table, ratio lines (each variant / ``ref``, default the first variant), noisy-timing warning,
    what the Δ columns compare, the memory method."""
    ref = ref or res.variants[0]
    names = res.variants
    w = max(8, *map(len, names))
    hdr = (
        f"{'variant':<{w}} {'median s':>9} {'min s':>8} {'cpu s':>8} {'peak MiB (median, min-max)':>27} "
        f"{'max|Δimage|':>12} {'max|Δlatent|':>13}"
    )
    print("\n" + hdr + "\n" + "-" * len(hdr))
    base = res.first[ref]
    for v in names:
        p = res.peaks[v]
        pk = "-" if not p else f"{res.peak(v):.1f}" if len(p) == 1 else f"{res.peak(v):.1f} ({min(p):.0f}-{max(p):.0f})"
        first = res.first[v]
        dl = float("nan") if first.latents is None or base.latents is None else _maxdiff(first.latents, base.latents)
        print(
            f"{v:<{w}} {res.median(v):9.3f} {res.min(v):8.3f} {res.cpu(v):8.3f} {pk:>27} "
            f"{_maxdiff(first.images, base.images):12.3g} {dl:13.3g}"
        )
    print("-" * len(hdr))
    for v in names:
        if v == ref:
            continue
        line = (
            f"ratio {v}/{ref}: time median {res.ratio(v, ref):.3f}, min {res.min(v) / res.min(ref):.3f}, "
            f"cpu {res.cpu(v) / res.cpu(ref):.3f}"
        )
        pr = res.peak_ratio(v, ref)
        if pr is not None:
            line += f"; peak memory {pr:.3f} ({res.peak(v) - res.peak(ref):+.1f} MiB)"
        print(line)
    print(
        f"(ratios of the medians of wall time, of the minimums and of the medians of process CPU time, all threads "
        f"('cpu s'); peak memory: of the medians; {res.repeats} timed runs each)"
    )
    spread = {v: max(res.times[v]) / min(res.times[v]) for v in names}
    if max(spread.values()) > 1.25:
        print(
            "WARNING: noisy timings (max/min per variant: "
            + ", ".join(f"{v} {s:.2f}" for v, s in spread.items())
            + "); trust the min and cpu ratios more than the median one, or rerun with more --repeats / on an idle machine"
        )
    what = "PIL pixels scaled to [0, 1]" if args.output_type == "pil" else "output latents"
    print(
        f"max|Δimage| / max|Δlatent|: each variant's first timed output vs that of {ref} ({what} / final latents before "
        f"decoding); same variant across rounds, max|Δimage|: " + ", ".join(f"{v} {res.noise[v]:.3g}" for v in names)
    )
    if any(res.peaks.values()):
        where = {
            "every": "every timed run",
            "last-round": "the last timed round",
            "extra-round": "one extra untimed round",
        }[res.memory_mode]
        print(f"peak memory: {res.memory.method}; measured in {where}")
    sys.stdout.flush()


def target(label: str, value: float | None, limit: float, fmt: str = ".3f") -> str:
    """Print and return 'target LABEL <= LIMIT: VALUE OK|OVER'."""
    verdict = "n/a" if value is None else "OK" if value <= limit else "OVER"
    lim = f"{limit:.2f}" if limit >= 0.01 else f"{limit:g}"
    line = f"target {label} <= {lim}: {'n/a' if value is None else format(value, fmt)} {verdict}"
    print(line)
    return line


def finish() -> int:
    print(
        f"load average after: {_load()} (other processes on this machine skew timings; ratios of alternated runs "
        f"are what to compare)"
    )
    sys.stdout.flush()
    return 0
