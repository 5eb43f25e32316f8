"""Shared attention across the images of a batch: StyleAligned, and AlignedGen's ShiftPE on FLUX.

StyleAligned (Hertz et al., "Style Aligned Image Generation via Shared Attention", CVPR 2024, §3,
Eq. 2-4). In self-attention every target image t of a batch also attends to the reference image r:

    Q̂_t = AdaIN(Q_t, Q_r),  K̂_t = AdaIN(K_t, K_r)                         (Eq. 3)
    AdaIN(x, y) = σ(y)·(x − μ(x))/σ(x) + μ(y)   (per channel, statistics over the tokens)
    O_t = softmax(Q̂_t·[K̂_t ; s·K_r]ᵀ/√d + [0 ; δ]) · [V_t ; V_r]            (Eq. 4)

and the reference attends only to itself, so its output is that of a run without the control.
``shared_scale`` is s (the official code's ``shared_score_scale``, multiplying the reference keys
of target rows), ``score_shift`` is δ (its ``shared_score_shift``: added as is to the logits of the
reference keys, so pass a log — the official transfer example uses ``log(2)``). Under CFG the
unconditional and conditional halves are handled separately, each with its own reference row, as
the official ``expand_first`` does. ``shared_norms`` shares the statistics of the UNet's GroupNorm
layers the same way (target ⊕ reference feature maps, concatenated along height; the official
``register_shared_norm``; LayerNorm sharing is omitted: it normalises each token alone, so
concatenating tokens changes nothing).

AlignedGen (Zhang et al. 2025, "AlignedGen: Aligning Style Across Generated Images", ShiftPE): on
FLUX the reference image's keys are appended with RoPE positions shifted by the image width along
x (``ids[:, 2] += width // 16`` in the official code), so they sit beside the target's tokens
instead of on top of them; AdaIN acts on the image tokens before RoPE, as there. We apply the shift
to the already rotated keys as one extra rotation by Δ = (0, 0, w) (rotations compose exactly) and
undo / redo RoPE around AdaIN. FLUX defaults follow the official ``inference.py``: only the
single-stream blocks share (``block=(19, 57)`` over FLUX.1's 19 double + 38 single attention
layers), the targets see the reference keys ×1.1 (``style_lambda=1.1``, mode ``"fix"``), at
every step (``timesteps=(0, 30)`` are step indices of its 30-step run); `SharedAttention.aligned_gen`
pins that setting. SD3 joint attention shares the image tokens the same way, without positions.

The reference row's output is bit-identical to a run without the control: `out` recomputes it
with SDPA over its own keys, as the stock layer does (the batched call would give it the same
values only up to float rounding).

Reference from a real image: ``reference_image=`` DDIM-inverts it with the run's ``run.invert``
(`attnctrl.inversion.invert_trajectory` on the run's pipeline and timesteps, guidance
``inversion_guidance``; the same inversion as `MutualSelfAttention(source_image=)`) with the reference
row's prompt (or ``reference_prompt``) to every timestep of the run, whatever its variance-preserving
scheduler (PNDM repeats a timestep; the inversion still steps between DDIM timesteps with DDIM's ᾱ),
and before every step replaces the reference row's latents with the inverted latents
`inverted_index` picks (the official ``make_inversion_callback(zts, offset)``). The reference row is
the batch row ``reference``: put the reference image's prompt at that place in the prompt list.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from ..attention import sdpa_scale
from ..control import Control
from ..images import open_image
from ..params import Range
from ..rope import rotate
from ..selectors import SelectorLike

_EPS = 1e-5  # the official calc_mean_std's eps
ALIGNED_GEN_KEY_SCALE = 1.1  # AlignedGen inference.py: --style_lambda 1.1 with style_lambda_mode="fix"


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """AdaIN of `x` toward `ref` (…, tokens, channels): per-channel mean/std over tokens (Eq. 3).

    The std is ``sqrt(var + eps)`` with the unbiased variance, as in the official ``calc_mean_std``.
    """
    m, s = x.mean(dim=-2, keepdim=True), (x.var(dim=-2, keepdim=True) + eps).sqrt()
    mr, sr = ref.mean(dim=-2, keepdim=True), (ref.var(dim=-2, keepdim=True) + eps).sqrt()
    return (x - m) / s * sr + mr


def inverted_index(step: int, offset: int, num_steps: int) -> int:
    """Which inverted latents the reference row takes at generation `step`: ``res.at_step(k)``.

    StyleAligned's ``make_inversion_callback(zts, offset)`` (``zts[m]`` the inverted latents at the
    run's m-th timestep, ``zts[N]`` the clean ones): the run starts from ``zts[offset]`` and after
    step i the callback writes ``zts[max(offset + 1, i + 1)]``, so step 0 reads ``zts[offset]`` and
    step i >= 1 reads ``zts[max(offset + 1, i)]``. With offset 0 that is ``zts[i]``: the latents
    of the step's own timestep. Clamped to N (the clean latents).
    """
    k = offset if step == 0 else max(offset + 1, step)
    return min(k, num_steps)


class SharedAttention(Control):
    """StyleAligned shared self-attention (Hertz et al. 2024); AlignedGen ShiftPE on FLUX.

    Args:
        reference: index of the reference image within the batch (prompt-major, then
            num_images_per_prompt); its output is that of a run without the control.
        adain_queries: AdaIN the targets' queries toward the reference's statistics.
        adain_keys: AdaIN the targets' keys toward the reference's statistics.
        adain_values: AdaIN the targets' values too (off in the paper).
        shared_scale: s, multiplies the reference keys seen by the targets (1: none; default 1,
            on FLUX 1.1, AlignedGen's ``style_lambda``).
        score_shift: δ added to the targets' logits of the reference keys (a log, e.g. 0.693 = log 2).
        shared_norms: also share the UNet's GroupNorm statistics with the reference (SD/SDXL only).
        layers: self-attention layers that share (default: all; on FLUX the single-stream
            blocks, as AlignedGen's ``block=(19, 57)``).
        steps: (start, stop) steps where sharing is on (ints or fractions).
        reference_image: an image (PIL or path) whose style to take; it is DDIM-inverted and
            becomes the reference row (SD/SDXL; any variance-preserving scheduler: DDIM, PNDM,
            DPM-Solver, ...; the inversion is DDIM over the run's own timesteps).
        reference_prompt: prompt used to invert reference_image (default: the reference row's prompt).
        inversion_guidance: CFG scale of the reference image's inversion (StyleAligned's transfer
            notebook: 2).
        inversion_offset: with reference_image, the reference row takes the inverted latents of
            step offset at step 0 and of step max(offset + 1, i) at step i >= 1 (StyleAligned's
            ``make_inversion_callback(zts, offset)``; the notebook uses 5 of 50; higher = more faithful).
    """

    name = "shared"
    effects = frozenset({"extends_kv", "edits_qkv"})  # the reference's keys/values appended (+ AdaIN)
    default_layers = "self"

    def __init__(
        self,
        reference: Annotated[int, Range(0)] = 0,
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        shared_scale: Annotated[float | None, Range(0)] = None,
        score_shift: float = 0.0,
        shared_norms: bool = False,
        layers: SelectorLike | None = None,
        steps: tuple[float, float] | None = None,
        reference_image: Any = None,
        reference_prompt: str | None = None,
        inversion_guidance: Annotated[float, Range(1)] = 2.0,
        inversion_offset: Annotated[int, Range(0)] = 0,
    ):
        if reference_prompt is not None and (not isinstance(reference_prompt, str) or not reference_prompt.strip()):
            raise ValueError("reference_prompt must be a non-empty string")
        super().__init__(layers=layers, steps=steps)
        self._user_layers = layers
        self.reference = reference
        self.adain_queries, self.adain_keys, self.adain_values = (
            bool(adain_queries),
            bool(adain_keys),
            bool(adain_values),
        )
        self.shared_scale = None if shared_scale is None else float(shared_scale)
        self.score_shift = float(score_shift)
        self.shared_norms = bool(shared_norms)
        self.reference_image = open_image(reference_image, what="reference image")
        self.reference_prompt = reference_prompt
        self.inversion_guidance = float(inversion_guidance)
        self.inversion_offset = inversion_offset

    @classmethod
    def aligned_gen(cls, **overrides) -> SharedAttention:
        """AlignedGen's published FLUX setting (Zhang et al. 2025, official ``inference.py``): share in
        the single-stream blocks only (``block=(19, 57)`` of FLUX.1's 19 + 38 attention layers), the
        targets see the reference keys ×1.1 (``style_lambda_mode="fix"``, ``style_lambda=1.1``), at
        every step (``timesteps=(0, 30)`` step indices in a 30-step run), AdaIN on q and k, no score
        shift, the reference masked from the shared keys (``constrain_first``). These are also the
        FLUX defaults of `SharedAttention()`; this preset pins them for any model with single blocks."""
        kw: dict[str, Any] = {
            "layers": "single",
            "shared_scale": ALIGNED_GEN_KEY_SCALE,
            "adain_queries": True,
            "adain_keys": True,
            "adain_values": False,
            "score_shift": 0.0,
        }
        kw.update(overrides)
        return cls(**kw)

    # ---- where ---------------------------------------------------------------------------------
    def narrow_layers(self, picked: list, grid) -> list:
        """FLUX default (no `layers=`): only the single-stream blocks, as AlignedGen."""
        if self._user_layers is not None:
            return picked
        single = [(lay, h) for lay, h in picked if lay.place == "single"]
        return single or picked

    def check_layers(self, picked) -> None:
        bad = [layer.name for layer, _ in picked if not layer.has_part("self")]
        if bad:
            raise ValueError(f"SharedAttention shares self-attention; not self-attention: {', '.join(bad)}")
        heads = [layer.name for layer, h in picked if h is not None]
        if heads:
            raise ValueError(f"SharedAttention shares whole layers; remove the heads= restriction ({', '.join(heads)})")

    # ---- lifetime ------------------------------------------------------------------------------
    def begin(self, run) -> None:
        in_loop = bool(run.timesteps)  # a ControlledPipeline run; ac.attach knows neither timesteps nor batch here
        if in_loop:
            self._check_reference(run.layout.images)
        elif run.family == "flux" or self.reference_image is not None or self.shared_norms:
            raise NotImplementedError(
                "SharedAttention on FLUX, with reference_image or with shared_norms needs a ControlledPipeline "
                "(ac.load(...) or ControlledPipeline(pipe)), not ac.attach"
            )
        scale = self.shared_scale
        if scale is None:
            scale = ALIGNED_GEN_KEY_SCALE if run.family == "flux" else 1.0
        store: dict = {"rows": {}, "bias": {}, "hooks": [], "scale": scale}
        run.store[self] = store
        if run.family == "flux":
            denoiser = run.denoiser
            device = next(denoiser.parameters()).device
            ids = torch.tensor([[0.0, 0.0, float(run.grid[1])]], device=device)
            store["shift"] = denoiser.pos_embed(ids)  # rotation by Δ = (0, 0, w): ShiftPE
        if self.reference_image is not None:
            store["trajectory"] = self._invert(run)
            store["step_values"] = [float(t) for t in store["trajectory"].timesteps.tolist()]  # no syncs in the loop
        if self.shared_norms:
            if run.family not in ("sd", "sdxl"):
                raise ValueError(f"shared_norms shares UNet GroupNorm statistics; {run.family} has no GroupNorm layers")
            self._install_norm_hooks(run, run.denoiser, store)

    def end(self, run) -> None:
        store = run.store.pop(self, None)
        if store:
            for handle in store["hooks"]:
                handle.remove()

    def _check_reference(self, images: int) -> None:
        if self.reference >= images:
            raise ValueError(
                f"SharedAttention reference={self.reference} is outside the batch of {images} image(s) "
                f"(valid: 0..{images - 1}); give more prompts or a smaller reference index"
            )

    # ---- batch rows ----------------------------------------------------------------------------
    def _rows(self, run, device) -> dict | None:
        """Per layout: `ref_of` (row → its branch's reference row), `targets`, `is_ref`; None if < 2 images."""
        layout = run.layout
        if layout.images < 2:
            return None
        cache = run.store[self]["rows"]
        key = (layout, device)
        rows = cache.get(key)
        if rows is None:
            n = layout.images
            self._check_reference(n)
            ref_of = torch.tensor([(i // n) * n + self.reference for i in range(layout.size)], device=device)
            is_ref = ref_of == torch.arange(layout.size, device=device)
            rows = cache[key] = {
                "ref_of": ref_of,
                "targets": torch.nonzero(~is_ref).flatten(),
                "is_ref": is_ref,
                "refs": torch.nonzero(is_ref).flatten(),
            }
        return rows

    # ---- attention -----------------------------------------------------------------------------
    def qkv(self, call) -> None:
        rows = self._rows(call.run, call.q.device)
        if rows is None or call.batch != call.run.layout.size:
            return
        ref_of, targets = rows["ref_of"], rows["targets"]
        tref = ref_of[targets]
        qi, ki = call.q_image, call.k_image
        rope = call.extras.get("rope") if call.run.family == "flux" else None

        def adained(x: torch.Tensor, img: slice) -> torch.Tensor:
            """x with its target rows' image tokens AdaIN-ed toward their reference (reference rows untouched)."""
            part, ref = x[targets][:, :, img], x[tref][:, :, img]
            if rope is not None:  # AdaIN acts before RoPE (AlignedGen): undo the rotation, then redo it
                cos, sin = rope[0][img], rope[1][img]
                part, ref = rotate(part, cos, -sin), rotate(ref, cos, -sin)
            new = adain(part, ref)
            if rope is not None:
                new = rotate(new, cos, sin)
            out = x.clone()
            out[targets, :, img] = new
            return out

        if self.adain_queries:
            call.q = adained(call.q, qi)
        if self.adain_keys:
            call.k = adained(call.k, ki)
        if self.adain_values:
            call.v = adained(call.v, ki)

        k_ref = call.k[ref_of][:, :, ki]
        v_ref = call.v[ref_of][:, :, ki]
        shift = call.run.store[self].get("shift")
        if shift is not None:  # ShiftPE: the reference's keys sit beside the target along x
            k_ref = rotate(k_ref, shift[0], shift[1])
        scale = call.run.store[self]["scale"]
        if scale != 1.0:
            k_ref = k_ref.clone()
            k_ref[targets] = k_ref[targets] * scale
        n_ref = k_ref.shape[2]
        call.extras["shared_keys"] = (call.k.shape[2], n_ref)
        call.extras["shared_mask"] = call.mask  # the model's own mask, for the reference rows in `out`
        call.k = torch.cat([call.k, k_ref], dim=2)
        call.v = torch.cat([call.v, v_ref], dim=2)
        if call.mask is not None:
            call.mask = F.pad(call.mask, (0, n_ref))

    def bias(self, call):
        sizes = call.extras.get("shared_keys")
        if sizes is None:
            return None
        n_own, n_ref = sizes
        rows = self._rows(call.run, call.q.device)
        key = (call.run.layout, n_own, n_ref, call.q.dtype, call.q.device)
        cache = call.run.store[self]["bias"]
        b = cache.get(key)
        if b is None:
            b = torch.zeros(call.batch, 1, 1, n_own + n_ref, dtype=call.q.dtype, device=call.q.device)
            b[rows["targets"], :, :, n_own:] = self.score_shift
            b[rows["is_ref"], :, :, n_own:] = float("-inf")  # the reference attends only to itself
            cache[key] = b
        return b

    def out(self, call, o: torch.Tensor) -> torch.Tensor:
        """The reference rows, recomputed as the stock layer computes them: SDPA over their own keys only.

        In the batched call they attend to ``[K_r ; K_r]`` with −∞ on the second half, which gives
        them zero weight but runs another kernel path (a mask, twice the keys, another blocking of
        the online softmax) than the stock unmasked call: ~1e-7 per layer, which the denoiser grows
        to 2-5e-5 in the final latents. SDPA is row-independent, so SDPA over just the reference
        rows' own q/k/v is bit-identical to those rows of the stock call (DESIGN: "reference rows
        identical to vanilla"). Where another control on the layer could make the stock result
        differ (it adds a bias, edits probabilities, edits outputs before this control, or appends
        keys after it) the batched result is kept: it reads no other row's keys either.
        """
        sizes = call.extras.get("shared_keys")
        if sizes is None:
            return o
        n_own, n_ref = sizes
        if call.k.shape[2] != n_own + n_ref or not self._exact_on(call):
            return o
        rows = self._rows(call.run, call.q.device)
        assert rows is not None  # sizes is set only when the reference is in the batch
        refs = rows["refs"]
        mask = call.extras.get("shared_mask")
        if mask is not None and mask.dim() == 4 and mask.shape[0] == call.batch:
            mask = mask[refs]
        scale = sdpa_scale(call.scale, call.q.shape[-1])  # as the layer's own SDPA call
        ref_out = F.scaled_dot_product_attention(
            call.q[refs], call.k[refs, :, :n_own], call.v[refs, :, :n_own], attn_mask=mask, dropout_p=0.0, scale=scale
        )
        if torch.is_grad_enabled():
            o = o.clone()  # keep autograd's saved tensors intact
        o[refs] = ref_out.to(o.dtype)
        return o

    def _exact_on(self, call) -> bool:
        """Whether the reference rows may be recomputed alone on this layer (see `out`); cached per layer."""
        cache = call.run.store[self].setdefault("exact", {})
        name = call.layer.name
        ok = cache.get(name)
        if ok is None:
            chain = [c for c, _ in call.run.plan.get(name, ())]
            mine = next((i for i, c in enumerate(chain) if c is self), len(chain))
            ok = mine < len(chain)
            for i, c in enumerate(chain):
                if c is self:
                    continue
                if c.implements("bias") or (c.implements("probs") and not c.observes_only):
                    ok = False  # its bias / probability edit would be missing from the recomputation
                elif i < mine and c.implements("out"):
                    ok = False  # its output edit on the reference rows would be overwritten
                elif i > mine and c.implements("qkv"):
                    ok = False  # it sees (and may edit) the shared keys
            cache[name] = ok
        return ok

    # ---- reference image -----------------------------------------------------------------------
    def _invert(self, run):
        """The reference image inverted to every timestep of the run (`run.invert`, guidance ``inversion_guidance``)."""
        if run.family not in ("sd", "sdxl"):
            raise NotImplementedError(f"SharedAttention(reference_image=...) supports SD and SDXL; not {run.family}")
        if run.invert is None:
            raise ValueError("reference_image needs a ControlledPipeline run (ac.attach cannot invert an image)")
        steps = len(run.timesteps)
        if self.inversion_offset >= steps:
            raise ValueError(
                f"inversion_offset={self.inversion_offset} but the run has {steps} scheduler steps; "
                f"give an offset below {steps}"
            )
        prompt = self.reference_prompt if self.reference_prompt is not None else run.prompt_of(self.reference)
        h, w = run.pixel_size
        return run.invert(self.reference_image, prompt, guidance_scale=self.inversion_guidance, height=h, width=w)

    def before_step(self, run, latents, denoise):
        """With a reference image: the reference row takes the inverted latents of `inverted_index`."""
        store, state = run.store.get(self), run.state
        if store is None or "trajectory" not in store or latents.shape[0] <= self.reference:
            return latents
        traj, values = store["trajectory"], store["step_values"]
        if state.index >= len(values) or state.timestep != values[state.index]:
            raise RuntimeError(
                f"SharedAttention: step {state.index} runs at timestep {state.timestep}, but the reference image was "
                "inverted for the scheduler's timesteps at the start of the run; do not change them during a run"
            )
        k = inverted_index(state.index, self.inversion_offset, len(values))
        latents = latents.clone()
        latents[self.reference] = traj.at_step(k)[0].to(latents.device, latents.dtype)
        return latents

    # ---- shared GroupNorm ----------------------------------------------------------------------
    def _install_norm_hooks(self, run, denoiser, store) -> None:
        def hook(module, args, output):
            x = args[0]
            if x.dim() != 4 or not self.active(run.state):
                return None
            rows = self._rows(run, x.device)
            if rows is None or x.shape[0] != run.layout.size:
                return None
            t = rows["targets"]
            joint = torch.cat([x[t], x[rows["ref_of"][t]]], dim=-2)  # official: concat along height
            normed = F.group_norm(joint, module.num_groups, module.weight, module.bias, module.eps)
            out = output.clone()
            out[t] = normed[..., : x.shape[-2], :]
            return out

        for m in denoiser.modules():
            if isinstance(m, torch.nn.GroupNorm):
                store["hooks"].append(m.register_forward_hook(hook))


__all__ = ["SharedAttention", "adain", "inverted_index"]
