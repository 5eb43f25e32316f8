"""Controls at real token counts: a FLUX.1-dev-shaped transformer at 512², 1024² and 2048².

The transformer has FLUX.1-dev's attention shape — 24 heads of 128 dims (3072 wide), 512 T5 text
tokens, 2×2 patches of a 1/8 latent (so ``(size/16)²`` image tokens) — with random weights and one
double-stream plus one single-stream block (every layer kind, few FLOPs); the text encoders, VAE
and scheduler are the embedded tiny FLUX's. One denoising step per run, latents out (no decode).
Two prompts per run (sharing controls need a second image). For each size the variants (stock diffusers, then each control) run in one process, alternating
(`harness.compare`); the table gives each variant's median time and peak-memory increment, and
their ratios to stock, per size, so the growth with tokens reads down a column.

    python bench/scale.py                                  # maps at 512², 1024², 2048² (~12 min on 2 cores)
    python bench/scale.py --sizes 512,1024 --controls maps,maps-full-matrix --repeats 3   # before/after
    python bench/scale.py --sizes 512,1024 --controls maps,pag,heads,modulation,shared,isolation,mutual
    python bench/scale.py --dtype bfloat16 --sizes 1024

Targets (issue "Real scale"): maps ≤ 1.15× stock time and ≤ 1.5× stock peak-memory increment at
1024²; at 2048² it runs wherever stock runs.
"""

from __future__ import annotations

import argparse
import sys

import harness  # first: sets OMP_WAIT_POLICY before torch loads
import torch

import attnctrl as ac
from attnctrl.models import tiny
from attnctrl.pipelines import ControlledPipeline

PROMPT = "a red car and a white sheep"


class FullMatrixMaps(ac.AttentionMaps):
    """The maps as they were read before probability blocks: from the full B×H×L×L matrix."""

    name = "maps-full-matrix"
    observes_only = True

    def reads(self, call):
        return None

    def needs_probs(self, call):
        return super().reads(call) is not None

    def probs(self, call, p):
        block = super().reads(call)
        self.observe(call, p[block.rows][:, :, block.queries, block.keys].float().mean(dim=1))
        return p


CONTROLS = {  # FLUX-appropriate settings of every control that runs on FLUX
    "maps": lambda: ac.AttentionMaps(),
    "pag": lambda: ac.PAG(layers="single", scale=3.0),
    "heads": lambda: ac.HeadPerturbation(heads="single,heads=0|1|2|3", scale=3.0),
    "modulation": lambda: ac.AttentionModulation(groups="red car;white sheep"),
    "shared": lambda: ac.SharedAttention(),
    "isolation": lambda: ac.IsolationReposition(["car", "sheep"]),
    "mutual": lambda: ac.MutualSelfAttention(),
    "maps-full-matrix": FullMatrixMaps,  # the previous maps path, for before/after (needs L×L memory)
}
#: two images of one prompt (SharedAttention and MutualSelfAttention share from image 0 to image 1;
#: the word-taking controls name words of every prompt)
PROMPTS = [PROMPT, PROMPT]


def flux_shaped(dtype: torch.dtype):
    """The embedded tiny FLUX pipeline with a FLUX.1-dev-shaped transformer (random weights)."""
    from diffusers import FluxTransformer2DModel

    pipe = tiny.build_tiny("tiny-flux")
    old = pipe.transformer.config
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=old.joint_attention_dim,
        pooled_projection_dim=old.pooled_projection_dim,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()
    return pipe.to(dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,1024,2048", help="image sizes in pixels (square), comma-separated")
    ap.add_argument("--controls", default="maps", help=f"comma-separated, from {', '.join(CONTROLS)}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    names = [c.strip() for c in args.controls.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTROLS]
    if unknown:
        ap.error(f"unknown control(s) {unknown}; choose from {', '.join(CONTROLS)}")
    pipe = flux_shaped(dtype)
    cp = ControlledPipeline(pipe)
    common = argparse.Namespace(
        device="cpu", seed=0, repeats=args.repeats, warmup=args.warmup, memory="every", order="fixed"
    )
    print(
        f"# bench/scale.py — FLUX.1-dev-shaped transformer (24×128 heads, 512 text tokens, 1+1 blocks), "
        f"{args.dtype}, 2 images, 1 step, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        # FLUX.1's VAE downsamples 8×; the embedded tiny VAE 2× (`vae_scale_factor`): the pipeline is
        # called at the height that gives FLUX's token count for `size`, (size/16)² image tokens
        px = size * pipe.vae_scale_factor // 8
        kw = dict(height=px, width=px, num_inference_steps=1, output_type="latent", max_sequence_length=512)
        variants = {
            "stock": harness.timed_call(
                lambda gen, keep, kw=kw: pipe(PROMPTS, generator=gen, callback_on_step_end=keep, **kw), common
            )
        }
        for name in names:
            variants[name] = harness.timed_call(
                lambda gen, keep, kw=kw, name=name: cp(
                    PROMPTS, generator=gen, controls=[CONTROLS[name]()], callback_on_step_end=keep, **kw
                ),
                common,
            )
        print(f"\n## {size}² — {(size // 16) ** 2} image tokens")
        res = harness.compare(variants, common)
        for v in variants:
            peak = sorted(res.peaks[v])[len(res.peaks[v]) // 2] if res.peaks[v] else float("nan")
            rows.append((size, v, res.median(v), peak))
    stock = {s: (t, m) for s, v, t, m in rows if v == "stock"}
    print("\n| size | image tokens | variant | time s | × stock | peak +MiB | × stock |")
    print("|---|---|---|---|---|---|---|")
    for size, v, t, m in rows:
        st, sm = stock[size]
        print(f"| {size}² | {(size // 16) ** 2} | {v} | {t:.1f} | {t / st:.2f} | {m:.0f} | {m / sm:.2f} |")
    return harness.finish()


if __name__ == "__main__":
    sys.exit(main())
