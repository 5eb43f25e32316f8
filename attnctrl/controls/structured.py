"""`StructuredGuidance`: StructureDiffusion's one key, many values (Feng et al., ICLR 2023).

"Training-Free Structured Diffusion Guidance for Compositional Text-to-Image Synthesis", §3.2:
the prompt P and each of its noun phrases p_1..p_n are encoded separately by the text encoder,
W_0 = CLIP(P), W_i = CLIP(p_i). Each W_i is *aligned* into the prompt's sequence: W̄_i equals
W_0 except at the tokens of p_i, which take p_i's own token embeddings (its tokens after BOS).
Every cross-attention layer then uses one key (from W_0) and many values (Eq. 4):

    O = softmax(Q·K_0ᵀ / √d) · (1/(n+1)) Σ_{i=0..n} V_i,     K_0 = W_0·W_k,  V_i = W̄_i·W_v  (W̄_0 = W_0),

on the conditional branch only (the unconditional rows attend as usual). This is the reference
implementation's default (non-"conjunction") mode: ``k = [c_0]``, ``v = [c_0] + aligned(c_1..c_n)``,
the full prompt counted once, noun phrases of one word skipped, in every UNet cross-attention layer.

Because softmax(QKᵀ)·V is linear in V, the mean of the values is one value tensor, so the layer still
runs one SDPA: the `qkv` hook replaces the conditional rows of V. The values are computed from the
embeddings the model is actually fed: at a token covered by c of the n phrases,
``V̄ = (1 − c/(n+1))·V_0 + (1/(n+1))·Σ_{phrases at the token} W_v·w_i`` — everything but V_0 is known
before the first step (`begin`), so each layer adds one precomputed tensor.

``conjunction=True`` is the reference's ``--conjunction`` mode for "A and B" prompts — many keys,
one value: ``O = (1/(n+1)) Σ_j softmax(Q·K_jᵀ/√d)·V̄``, K_j from the prompt (j = 0) and from each
phrase aligned alone, V̄ from the prompt with all phrases aligned into it; the `out` hook adds the n
extra attentions of the cond rows (n SDPA calls per layer).

SDXL: the cross-attention sees both CLIP encoders' hidden states concatenated feature-wise; each
phrase is encoded by both (the pipeline's own `encode_prompt`, the run's ``run.text.encode``) and
aligned at the same positions.
SD3 / FLUX are refused before the first step: in joint attention the text tokens are themselves
transformed by every block (their values at block b come from block b−1's text stream, not from the
text encoder), so encoder-level phrase embeddings cannot stand in for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F

from ..attention import sdpa_scale
from ..control import Control
from ..params import WORDS, Range
from ..phrases import Phrase, noun_phrases
from ..selectors import SelectorLike
from ..state import TextEncoders
from ..tokens import TokenError, prompt_words, resolve

_JOINT_ERROR = (
    "StructuredGuidance works on UNet cross-attention (SD 1.x/2.x, SDXL); {family} uses joint "
    "attention, where the text tokens are transformed by every block, so per-phrase values from the "
    "text encoder cannot be substituted for them (layers: {layers})"
)


class StructuredGuidance(Control):
    """StructureDiffusion: one key, many values in cross-attention (Feng et al., ICLR 2023, Eq. 4).

    Args:
        phrases: noun phrases of the prompt to encode separately (``"a red car"``; ``"dog#2"`` for a
            second occurrence); for a batch of prompts either one list used for every prompt or one
            list per prompt. None: found by the chunker (spaCy if installed, else built-in rules),
            keeping phrases of at least ``min_words`` words. An empty list: no change (stock output).
        backend: chunker when ``phrases`` is None: "auto", "spacy" or "rules".
        min_words: shortest automatically found phrase kept (the reference skips one-word phrases).
        conjunction: the reference's ``--conjunction`` mode for "A and B" prompts: many keys, one value,
            ``O = (1/(n+1)) Σ_j softmax(Q·K_jᵀ/√d)·V̄`` with K_j from the prompt and each aligned
            phrase, V̄ from the prompt with every phrase aligned into it.
        layers: cross-attention layers to act on (default: all of them, as in the paper).
        steps: (start, stop) step range, ints or fractions (default: every step).
    """

    name = "structured"
    effects = frozenset({"edits_values"})  # the cond rows' values ← the phrases' mean (Eq. 4)
    default_layers = "cross"

    def __init__(
        self,
        phrases: Annotated[Sequence[str] | None, WORDS] = None,
        backend: Literal["auto", "spacy", "rules"] = "auto",
        min_words: Annotated[int, Range(1)] = 2,
        conjunction: bool = False,
        layers: SelectorLike | None = None,
        steps=None,
    ):
        if isinstance(phrases, str):
            phrases = [phrases]
        if phrases is not None:
            phrases = [list(p) if not isinstance(p, str) else p for p in phrases]
            flat = [q for p in phrases for q in ([p] if isinstance(p, str) else p)]
            bad = [q for q in flat if not isinstance(q, str) or not q.strip()]
            if bad:
                raise ValueError(f"phrases must be non-empty strings (or one list of them per prompt), got {bad!r}")
            nested = [isinstance(p, list) for p in phrases]
            if any(nested) and not all(nested):
                raise ValueError("phrases: give either one list of phrases, or one list per prompt, not a mix")
        super().__init__(layers=layers, steps=steps)
        self.phrases = phrases
        self.backend = backend
        self.min_words = min_words
        self.conjunction = bool(conjunction)

    # ---- where ---------------------------------------------------------------------------------
    def check_layers(self, picked) -> None:
        joint = [layer.name for layer, _ in picked if layer.kind == "joint"]
        if joint:
            raise NotImplementedError(
                _JOINT_ERROR.format(
                    family="SD3/FLUX", layers=", ".join(joint[:3]) + (", ..." if len(joint) > 3 else "")
                )
            )
        bad = [layer.name for layer, _ in picked if layer.kind != "cross"]
        if bad:
            raise ValueError(f"StructuredGuidance acts on cross-attention; not cross-attention: {', '.join(bad)}")

    # ---- phrases -------------------------------------------------------------------------------
    def phrases_for(self, prompts: Sequence[str]) -> list[list[Phrase]]:
        """The phrases used for each prompt (user-given, or found and filtered), in prompt order.

        A phrase covering the whole prompt is dropped (the full prompt is already V_0), as are
        duplicates. Raises `TokenError` for a given phrase that is not in its prompt."""
        if self.phrases is not None and self.phrases and isinstance(self.phrases[0], list):
            if len(self.phrases) != len(prompts):
                raise ValueError(
                    f"phrases has {len(self.phrases)} lists for {len(prompts)} prompts; give one list per prompt"
                )
            given: list = list(self.phrases)
        else:
            given = [self.phrases] * len(prompts)
        out = []
        for prompt, want in zip(prompts, given):
            if not prompt or not prompt.strip():
                raise ValueError("StructuredGuidance needs the prompt text (it was given as prompt_embeds or empty)")
            found = noun_phrases(prompt, phrases=want, backend=self.backend)
            if want is None:
                found = [p for p in found if p.num_words >= self.min_words]
            n_words = len(prompt_words(prompt))
            seen, keep = set(), []
            for p in found:
                span = (p.start_word, p.end_word)
                if span in seen or (p.start_word == 0 and p.end_word == n_words):
                    continue
                seen.add(span)
                keep.append(p)
            out.append(keep)
        return out

    # ---- run lifetime --------------------------------------------------------------------------
    def begin(self, run) -> None:
        run.store[self] = None
        if run.family not in ("sd", "sdxl"):
            raise NotImplementedError(_JOINT_ERROR.format(family=run.family.upper(), layers="all"))
        text = run.needs_text("StructuredGuidance")
        if text.encode is None:
            raise ValueError(
                "StructuredGuidance needs the text encoders: run it through ac.ControlledPipeline "
                "(ac.load(...)), not ac.attach"
            )
        prompts = list(run.prompts)
        per_prompt = self.phrases_for(prompts)
        if not any(per_prompt):
            return  # nothing to guide: the layers compute the stock attention
        for name, entries in run.plan.items():
            if any(c is self for c, _ in entries):
                module = run.denoiser.get_submodule(name)
                if getattr(module, "norm_cross", None) is not None:
                    raise NotImplementedError(
                        f"StructuredGuidance does not support layers with a cross-attention norm ({name})"
                    )
        pieces = _phrase_tokens(text.encode, _tokenizers(text, run.family), prompts, per_prompt)
        per_image = run.images_per_prompt()
        st: dict[str, Any] = {"phrases": per_prompt, "cache": {}}
        if self.conjunction:
            single, single_mask, keys, key_weights = _conjunction_sequences(pieces)
            st.update(single=single, single_mask=single_mask, keys=keys, key_weights=key_weights)
        else:
            add, weight = _mean_sequence(pieces)
            st.update(add=add, weight=weight)
        for k in ("add", "weight", "single", "single_mask", "key_weights"):
            if k in st:
                st[k] = st[k].repeat_interleave(per_image, dim=0)
        if "keys" in st:
            st["keys"] = [
                (e.repeat_interleave(per_image, dim=0), m.repeat_interleave(per_image, dim=0)) for e, m in st["keys"]
            ]
        run.store[self] = st

    def end(self, run) -> None:
        run.store.pop(self, None)

    # ---- attention -----------------------------------------------------------------------------
    def _layer_tensors(self, call, st) -> dict:
        """Per layer, computed once per run: the projected phrase values (and keys) of the cond rows."""
        key = (call.layer.name, call.v.dtype, call.v.device)
        cached = st["cache"].get(key)
        if cached is not None:
            return cached
        v = call.v
        heads = v.shape[1]

        def proj(linear, emb):  # (B, L, C) -> (B, H, L, D), and to_v(0) (the affine part)
            emb = emb.to(device=v.device, dtype=v.dtype)
            if emb.shape[1] != v.shape[2]:
                raise ValueError(
                    f"StructuredGuidance: layer {call.layer.name} sees {v.shape[2]} text tokens but the phrases "
                    f"were aligned to {emb.shape[1]}; the prompt encoding changed (prompt_embeds of another length?)"
                )
            out = linear(emb).view(emb.shape[0], emb.shape[1], heads, -1).transpose(1, 2)
            zero = linear(emb.new_zeros(1, 1, emb.shape[-1])).view(1, heads, 1, -1)
            return out, zero

        def col(t):  # (B, L) -> (B, 1, L, 1)
            return t.to(device=v.device, dtype=v.dtype)[:, None, :, None]

        with torch.no_grad():
            if self.conjunction:
                vals, _ = proj(call.module.to_v, st["single"])
                keys = [(col(m), proj(call.module.to_k, e)[0]) for e, m in st["keys"]]
                out = {
                    "keep": 1 - col(st["single_mask"]),
                    "values": col(st["single_mask"]) * vals,
                    "keys": keys,
                    "key_weights": st["key_weights"].to(device=v.device, dtype=v.dtype),
                }
            else:
                vals, zero = proj(call.module.to_v, st["add"])
                w = col(st["weight"])
                out = {"keep": w, "values": vals - w * zero}
        st["cache"][key] = out
        return out

    def qkv(self, call) -> None:
        """V of the cond rows ← mean of the values (Eq. 4), or the single aligned values (conjunction)."""
        st = call.run.store.get(self)
        if st is None or not call.run.layout.has("cond") or call.k_text is None:
            return
        rows = call.run.layout.rows("cond")
        t = self._layer_tensors(call, st)
        v = call.v.clone()  # never write into a tensor another control may hold (or an expanded view)
        if call.heads is None:
            v[rows] = t["keep"] * v[rows] + t["values"]
        else:
            hs = sorted(call.heads)
            v[rows, hs] = t["keep"] * v[rows, hs] + t["values"][:, hs]
        call.v = v

    def out(self, call, o):
        """Conjunction mode: the cond rows average the attention over the n+1 keys (one value)."""
        if not self.conjunction:
            return o
        st = call.run.store.get(self)
        if st is None or not call.run.layout.has("cond") or call.k_text is None:
            return o
        rows = call.run.layout.rows("cond")
        t = self._layer_tensors(call, st)
        q, k, v = call.q[rows], call.k[rows], call.v[rows]
        a = t["key_weights"]  # (B, n+1): 1/(n_b+1) for the keys of prompt b, 0 past its phrases
        total = a[:, 0, None, None, None] * o[rows]
        scale = sdpa_scale(call.scale, q.shape[-1])
        for j, (mask, keys) in enumerate(t["keys"], start=1):
            kj = (1 - mask) * k + mask * keys
            total = total + a[:, j, None, None, None] * F.scaled_dot_product_attention(q, kj, v, scale=scale)
        if torch.is_grad_enabled():
            o = o.clone()
        if call.heads is None:
            o[rows] = total
        else:
            hs = sorted(call.heads)
            o[rows, hs] = total[:, hs]
        return o


# ---------------------------------------------------------------------------------- encoding


def _tokenizers(text: TextEncoders, family: str) -> list:
    """The tokenizers of the encoders whose hidden states the UNet sees (SDXL: both, concatenated)."""
    if family == "sd":
        return [text.tokenizer]
    return [tok for tok in (text.tokenizer, text.tokenizer_2) if tok is not None]


def _max_length(tok) -> int | None:
    limit = getattr(tok, "model_max_length", None)
    return limit if limit and limit < 1_000_000 else None


def _phrase_tokens(
    encode: Callable[[list[str]], torch.Tensor], tokenizers: list, prompts: list[str], per_prompt: list[list[Phrase]]
):
    """Per prompt, ``(length L, width C, [(positions in the prompt's sequence, phrase token embeddings), ...])``.

    Each phrase is encoded alone (`encode`: the run's ``text.encode``, the pipeline's own prompt
    embeddings without CFG, (len, L, C)); its own tokens after BOS go to the positions its words
    occupy in the prompt's token sequence (the reference's `align_sequence`: ``seq[1 : 1 + len]``),
    found with `tokenizers` (SDXL: both, which must agree)."""
    texts = list(dict.fromkeys(p.text for ps in per_prompt for p in ps))
    emb = encode(texts)
    row = {t: i for i, t in enumerate(texts)}
    out = []
    for prompt, phrases in zip(prompts, per_prompt):
        items = []
        for p in phrases:
            positions, *others = [resolve(tok, prompt, p.spec, max_length=_max_length(tok)) for tok in tokenizers]
            for idx in others:
                if idx != positions:
                    raise TokenError(
                        f"phrase {p.text!r} falls on different token positions for the two text encoders "
                        f"({positions} vs {idx}); StructuredGuidance needs them aligned"
                    )
            items.append((positions, emb[row[p.text], 1 : 1 + len(positions)]))
        out.append(items)
    return emb.shape[1], emb.shape[2], emb.dtype, emb.device, out


def _mean_sequence(pieces):
    """``add`` = (1/(n+1))·Σ_i (phrase i's tokens at its positions, 0 elsewhere) and ``weight`` = 1 − c/(n+1)
    (c: phrases covering the token), so that mean(W_0, W̄_1..W̄_n) = weight·W_0 + add, token by token."""
    n_tok, width, dtype, device, per_prompt = pieces
    add = torch.zeros(len(per_prompt), n_tok, width, dtype=dtype, device=device)
    weight = torch.ones(len(per_prompt), n_tok, dtype=dtype, device=device)
    for b, items in enumerate(per_prompt):
        k = len(items) + 1
        for positions, tokens in items:
            add[b, positions] += tokens / k
            weight[b, positions] -= 1.0 / k
    return add, weight


def _conjunction_sequences(pieces):
    """The reference's ``--conjunction`` sequences: one value sequence with every phrase aligned into it
    (later phrases written over earlier ones where they overlap), and one key sequence per phrase (each
    phrase aligned alone) besides the prompt's own; ``key_weights[b, j]`` = 1/(n_b+1) for the keys of
    prompt b (j = 0 the prompt's own key), 0 for the slots of phrases it does not have."""
    n_tok, width, dtype, device, per_prompt = pieces
    B, n_max = len(per_prompt), max(len(items) for items in per_prompt)
    single = torch.zeros(B, n_tok, width, dtype=dtype, device=device)
    single_mask = torch.zeros(B, n_tok, dtype=dtype, device=device)
    keys = [
        (torch.zeros(B, n_tok, width, dtype=dtype, device=device), torch.zeros(B, n_tok, dtype=dtype, device=device))
        for _ in range(n_max)
    ]
    key_weights = torch.zeros(B, n_max + 1, dtype=dtype, device=device)
    for b, items in enumerate(per_prompt):
        key_weights[b, : len(items) + 1] = 1.0 / (len(items) + 1)
        for j, (positions, tokens) in enumerate(items):
            single[b, positions] = tokens
            single_mask[b, positions] = 1.0
            keys[j][0][b, positions] = tokens
            keys[j][1][b, positions] = 1.0
    return single, single_mask, keys, key_weights


__all__ = ["StructuredGuidance"]
