"""`AttentionModulation`: phase-wise attention modulation for multi-entity prompts.

Wu et al., "Towards Better Text-to-Image Generation Alignment via Attention Modulation"
(arXiv 2404.13899, 2024), method section. The paper has no public code; this is our reading of
its three components (see ``docs/attention-modulation.md``):

1. **Self-attention temperature** (early phase). ``softmax(Q·Kᵀ / (τ·√d))·V`` on self-attention
   for the first steps: τ < 1 sharpens each patch's attention toward the patches most similar to
   it and suppresses unrelated ones, which the paper uses against entity leakage while the layout
   forms. Implemented as the SDPA ``scale`` divided by τ — no probability matrix is formed.
2. **Object-focused cross-attention masking.** The prompt's entities come as groups (an entity
   noun and its attribute words, e.g. ``[["red", "car"], ["white", "sheep"]]``). Every image patch
   is assigned to the group whose entity noun(s) it attends to most, and the tokens of the *other*
   groups are masked out (−∞ on their logits) for that patch; tokens outside every group (BOS,
   EOS, padding, function words) stay visible. So a patch showing the car cannot read "white" or
   "sheep".
3. **Phase-wise entity / attribute weights.** Attention to entity tokens is multiplied by
   ``w_e`` and to attribute tokens by ``w_a``, then each row renormalised — a different pair in the
   early and the late phase (the paper attends to different syntactic components at different
   timesteps; e.g. entities/layout early, attributes late). Reweighting a
   softmax row and renormalising equals adding ``log w`` to those logits, so the weights go into
   the same additive bias as the mask and SDPA still does the attention.

Assignment rule (2): for patch ``i`` and group ``g`` with entity tokens ``E_g``, the score is the
head average of ``log Σ_{j∈E_g} exp(s_hij)`` with ``s_hij = q_hi·k_hj·scale``. Since
``p_hij = exp(s_hij) / Z_hi`` and ``Z_hi`` is the same for every group, this is the head average of
``log P_h(i → E_g)`` up to a constant per patch: the group with the largest geometric-mean
(over heads) attention mass wins. Only the logits of the entity columns are computed, one
assignment per image row and patch, shared by all (selected) heads — so the bias is
``(B, 1, Lq, Lk)`` (``(B, H, Lq, Lk)`` only when ``heads=`` restricts the control).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch

from ..control import Control
from ..params import GROUPS, Range
from ..selectors import SelectorLike
from ..tokens import GroupsLike, TokenError, parse_groups

_NEG_INF = float("-inf")


def _groups(groups: GroupsLike | None) -> list[list[str]]:
    """`attnctrl.tokens.parse_groups`, then this control's rules: words only (entity noun last),
    and no word in two groups."""
    out = parse_groups(groups)
    for words in out:
        for w in words:
            if not isinstance(w, str):
                raise ValueError(f"groups: each word must be a non-empty string, got {w!r} in {words!r}")
    seen: dict[str, int] = {}
    for g, words in enumerate(out):
        for w in words:
            key = " ".join(w.casefold().split())
            if key in seen and seen[key] != g:
                raise ValueError(
                    f"groups overlap: {w!r} is in group {seen[key] + 1} and group {g + 1}; "
                    "a token belongs to one entity (use 'word#2' for a second occurrence)"
                )
            seen[key] = g
    return out


def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    try:
        early, late = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or an (early, late) pair, got {value!r}") from None
    if not (early > 0 and late > 0 and math.isfinite(early) and math.isfinite(late)):
        raise ValueError(f"{name} weights must be finite and > 0, got {value!r}")
    return early, late


def _steps(value, name: str) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (start, stop) pair, got {value!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(
                f"{name} must hold numbers >= 0 (ints: step indices, floats in [0, 1]: fractions), got {value!r}"
            )
    return lo, hi


def _index(x, num_steps: int) -> int:
    """Control.step_range's convention: floats in [0, 1] are fractions of the steps, else indices."""
    return round(x * num_steps) if isinstance(x, float) and 0.0 <= x <= 1.0 else int(x)


@dataclass
class _Tokens:
    """Resolved token columns of one prompt, as indices into the layer's text keys."""

    entity: list[list[int]]  # per group: its entity-noun tokens
    members: list[list[int]]  # per group: all its tokens (entity + attributes)
    attributes: list[int]  # every attribute token of every group
    entities: list[int]  # every entity token of every group
    cache: dict = field(default_factory=dict)

    def tensors(self, n_txt: int, device: torch.device, dtype: torch.dtype) -> dict:
        """Index tensors for a layer with `n_txt` text keys, built once per device and dtype:
        ``entities`` (|E|,) columns, ``onehot`` (|E|, G) entity column → group, ``group`` (n_txt,)
        group of every text key (−1 outside the groups), ``is_entity`` / ``is_attribute`` masks."""
        key = (n_txt, device, dtype)
        found = self.cache.get(key)
        if found is None:
            group = torch.full((n_txt,), -1, dtype=torch.long)
            for g, cols in enumerate(self.members):
                group[cols] = g
            onehot = torch.zeros(len(self.entities), len(self.entity), dtype=torch.float32)
            pos = {c: j for j, c in enumerate(self.entities)}
            for g, cols in enumerate(self.entity):
                onehot[[pos[c] for c in cols], g] = 1.0
            is_entity = torch.zeros(n_txt, dtype=torch.bool)
            is_entity[self.entities] = True
            is_attribute = torch.zeros(n_txt, dtype=torch.bool)
            is_attribute[self.attributes] = True
            found = {
                "entities": torch.tensor(self.entities, dtype=torch.long).to(device),
                "onehot": onehot.to(device),
                "group": group.to(device),
                "is_entity": is_entity.to(device),
                "is_attribute": is_attribute.to(device),
                "log_weights": {},
            }
            self.cache[key] = found
        return found


@dataclass(frozen=True)
class _Phase:
    """What is on at one step."""

    any: bool
    temperature: bool
    mask: bool
    entity_weight: float
    attribute_weight: float

    @property
    def reweight(self) -> bool:
        return self.entity_weight != 1.0 or self.attribute_weight != 1.0


class AttentionModulation(Control):
    """Attention Modulation (Wu et al. 2024, arXiv 2404.13899): early self-attention temperature,
    object-focused cross-attention masking and phase-wise entity/attribute weights.

    Every knob at its neutral value (``temperature=1``, no ``groups`` or ``mask=False``, weights 1)
    gives the stock pipeline's output, and the layers then run their stock processor.

    Attention hooks: only at the steps where some component is on (`attends`: `temperature_steps`,
    `mask_steps`, the weights of the step's phase), each component in its own window.

    Args:
        groups: the prompt's entities, each an entity noun with its attribute words, entity noun
            last: ``"red car;white sheep"`` (groups separated by ';'), ``["red car", "white sheep"]``
            or ``[["red", "car"], ["white", "sheep"]]``. Words/phrases of the prompt as in
            ``attnctrl tokens`` (``"dog#2"`` for a second occurrence); groups must not share a token.
        temperature: τ > 0 of the self-attention softmax, ``softmax(QKᵀ/(τ√d))``; < 1 sharpens
            (the paper's use), 1 is off.
        temperature_steps: (start, stop) steps where τ applies; ints are step indices, floats in
            [0, 1] fractions of the steps (default: the first 20%).
        mask: object-focused masking: each image patch keeps only the group whose entity it
            attends to most (plus every token outside the groups); needs two or more ``groups``.
        mask_steps: (start, stop) steps of the masking (default: all).
        entity_weight: (early, late) weight of the attention to entity tokens (a number: both).
        attribute_weight: (early, late) weight of the attention to attribute tokens (a number: both).
        phase_split: where the early phase ends, as a fraction of the steps (or a step index).
        layers: selector of the layers (default: the self-attention layers when τ ≠ 1, the
            cross-attention layers when groups are given; SD3/FLUX joint layers are both). τ acts
            on the self part of the selected layers, masking and weights on their image→text part;
            ``heads=`` restricts every component to those heads.
    """

    name = "modulation"
    effects = frozenset({"edits_scale"})  # qkv applies τ (the scale, or q/k scaled per head)
    default_layers = ("self", "cross")

    def __init__(
        self,
        groups: Annotated[GroupsLike | None, GROUPS] = None,
        temperature: Annotated[float, Range(0, lo_open=True)] = 1.0,
        temperature_steps: tuple[float, float] = (0, 0.2),
        mask: bool = True,
        mask_steps: tuple[float, float] = (0, 1.0),
        entity_weight: tuple[float, float] = (1.0, 1.0),
        attribute_weight: tuple[float, float] = (1.0, 1.0),
        phase_split: Annotated[float, Range(0)] = 0.5,
        layers: SelectorLike | None = None,
    ):
        self.groups = _groups(groups)
        self.temperature = float(temperature)
        self.temperature_steps = _steps(temperature_steps, "temperature_steps")
        self.mask = bool(mask)
        self.mask_steps = _steps(mask_steps, "mask_steps")
        self.entity_weight = _pair(entity_weight, "entity_weight")
        self.attribute_weight = _pair(attribute_weight, "attribute_weight")
        self.phase_split = phase_split
        weighted = self.entity_weight != (1.0, 1.0) or self.attribute_weight != (1.0, 1.0)
        if weighted and not self.groups:
            raise ValueError(
                "entity_weight / attribute_weight need `groups` (which tokens are entities and attributes)"
            )
        self._uses_self = self.temperature != 1.0
        self._masks = self.mask and len(self.groups) > 1  # one group: every patch is assigned to it
        self._uses_cross = self._masks or (bool(self.groups) and weighted)
        if layers is None:  # only the layer kinds that have work to do
            kinds = [k for k, on in (("self", self._uses_self), ("cross", self._uses_cross)) if on]
            layers = kinds or list(self.default_layers)
        super().__init__(layers=layers, steps=None)

    # ---- when ----------------------------------------------------------------------------------
    def phase(self, index: int, num_steps: int) -> _Phase:
        """Which components are on at step `index` of `num_steps`."""
        lo, hi = (_index(x, num_steps) for x in self.temperature_steps)
        temp = self._uses_self and lo <= index < hi
        lo, hi = (_index(x, num_steps) for x in self.mask_steps)
        mask = self._masks and lo <= index < hi
        late = index >= _index(self.phase_split, num_steps)
        we = self.entity_weight[late] if self.groups else 1.0
        wa = self.attribute_weight[late] if self.groups else 1.0
        return _Phase(temp or mask or we != 1.0 or wa != 1.0, temp, mask, we, wa)

    def _phase_of(self, run) -> _Phase | None:
        """The phase of the run's current step (None before the first), cached per run and step."""
        state = run.state
        if state is None:
            return None
        phases = run.store.get(self, {}).get("phases")
        if phases is None:  # a run this control did not `begin`: compute, do not cache
            return self.phase(state.index, state.num_steps)
        key = (state.index, state.num_steps)
        found = phases.get(key)
        if found is None:
            found = phases[key] = self.phase(state.index, state.num_steps)
        return found

    def attends(self, run) -> bool:
        """Only at steps where some component acts (its own step windows, not `steps`): elsewhere
        the layers keep their stock processor."""
        ph = self._phase_of(run)
        if ph is None:
            return self._uses_self or self._uses_cross
        return ph.any

    # ---- lifetime ------------------------------------------------------------------------------
    def begin(self, run) -> None:
        """Resolve the groups' words to text-key indices for every prompt of the run (errors before any step)."""
        run.store[self] = {"phases": {}}
        if not self.groups:
            return
        run.needs_text("AttentionModulation with groups")
        per = run.images_per_prompt()
        run.store[self]["tokens"] = [self._resolve(run, n * per) for n in range(len(run.prompts))]

    def _resolve(self, run, image: int) -> _Tokens:
        """The groups' text-key columns in the prompt of image `image` (the first image of its prompt)."""
        prompt = run.prompt_of(image)
        entity: list[list[int]] = []
        members: list[list[int]] = []
        owner: dict[int, int] = {}
        for g, words in enumerate(self.groups):
            cols = []
            for w in words:
                try:
                    idx = run.tokens(image, w)
                except TokenError as err:
                    raise TokenError(f"AttentionModulation group {' '.join(words)!r}: {err}") from None
                for i in idx:
                    if owner.get(i, g) != g:
                        raise ValueError(
                            f"AttentionModulation groups overlap: token {i} ({w!r}) is in group "
                            f"{' '.join(self.groups[owner[i]])!r} and group {' '.join(words)!r} of the prompt {prompt!r}"
                        )
                    owner[i] = g
                cols.append(idx)
            entity.append(sorted(set(cols[-1])))
            members.append(sorted({i for c in cols for i in c}))
        ent = sorted({i for e in entity for i in e})
        attr = sorted({i for m in members for i in m} - set(ent))
        return _Tokens(entity, members, attr, ent)

    def end(self, run) -> None:
        run.store.pop(self, None)

    # ---- attention: temperature on the self part -----------------------------------------------
    def qkv(self, call) -> None:
        """τ on self-attention logits, ``softmax(QKᵀ/(τ√d))`` (Wu et al. 2024, self-attention
        temperature control): the SDPA scale becomes ``scale / τ``. On joint layers (SD3/FLUX) the
        logits against image keys are divided by τ (keys scaled), the image→image block being the
        self-attention part."""
        ph = self._phase_of(call.run)
        if ph is None or not ph.temperature:
            return
        if call.k_image.stop <= call.k_image.start:
            return  # pure image→text cross-attention: no self part
        inv = 1.0 / self.temperature
        if call.k_text is None and call.heads is None:
            call.scale = call.scale * inv
            return
        factor = torch.ones(1, call.k.shape[1], 1, 1, dtype=call.k.dtype, device=call.k.device)
        factor[:, sorted(call.heads) if call.heads is not None else slice(None)] = inv
        if call.k_text is None:
            call.q = call.q * factor
        else:
            k = call.k.clone()
            k[:, :, call.k_image] = k[:, :, call.k_image] * factor
            call.k = k

    # ---- attention: mask and weights on the image→text part -------------------------------------
    def bias(self, call):
        """Additive logits bias on image queries → text keys: −∞ on other groups' tokens (masking)
        plus ``log w_e`` / ``log w_a`` on entity / attribute tokens (phase-wise weights): reweighting
        a softmax row by w and renormalising is ``softmax(s + log w)``."""
        if call.k_text is None:
            return None
        ph = self._phase_of(call.run)
        if ph is None or not (ph.mask or ph.reweight):
            return None
        tokens = call.run.store[self]["tokens"]
        layout = call.run.layout
        per_prompt = call.run.images_per_prompt()  # tokens: one entry per prompt
        n_q, n_k = call.q.shape[2], call.k.shape[2]
        n_txt = call.k_text.stop - call.k_text.start
        heads = None if call.heads is None else sorted(call.heads)
        # a query-independent bias (weights only, every query an image token) broadcasts over queries
        full = ph.mask or not (call.q_image.start == 0 and call.q_image.stop == n_q)
        qs = call.q_image if full else slice(0, 1)
        bias = call.q.new_zeros(call.batch, 1 if heads is None else call.q.shape[1], n_q if full else 1, n_k)
        target = bias if heads is None else bias[:, heads]  # a copy when heads are restricted
        for branch in layout.branches:
            if branch == "uncond":  # the negative prompt has no groups
                continue
            base = layout.rows(branch).start
            for p, tok in enumerate(tokens):
                rows = slice(base + p * per_prompt, base + (p + 1) * per_prompt)
                idx = tok.tensors(n_txt, call.q.device, call.q.dtype)
                block = target[rows, :, qs, call.k_text]  # (R, 1 or |heads|, Lq', n_txt)
                if ph.mask:
                    assigned = self._assign(call, rows, idx, heads)  # (R, Lq)
                    other = (idx["group"] >= 0) & (idx["group"] != assigned[..., None])
                    block = block.masked_fill(other[:, None], _NEG_INF)
                if ph.reweight:
                    block = block + self._log_weights(idx, ph, call.q.dtype)
                target[rows, :, qs, call.k_text] = block
        if heads is not None:
            bias[:, heads] = target
        return bias

    @staticmethod
    def _log_weights(idx: dict, ph: _Phase, dtype: torch.dtype) -> torch.Tensor:
        """(n_txt,) vector: log w_e on entity tokens, log w_a on attribute tokens, 0 elsewhere (cached)."""
        key = (ph.entity_weight, ph.attribute_weight)
        found = idx["log_weights"].get(key)
        if found is None:
            found = idx["is_entity"] * math.log(ph.entity_weight) + idx["is_attribute"] * math.log(ph.attribute_weight)
            found = idx["log_weights"][key] = found.to(dtype)
        return found

    @staticmethod
    def _assign(call, rows: slice, idx: dict, heads) -> torch.Tensor:
        """Group of every image patch (R, Lq): argmax over groups of the head-averaged log attention
        mass on the group's entity tokens, ``mean_h log Σ_{j∈E_g} exp(s_hij)`` (the softmax
        normaliser is common to all groups, so only the entity columns' logits are computed)."""
        q = call.q[rows, :, call.q_image]
        k = call.k[rows].index_select(2, idx["entities"] + call.k_text.start)
        if heads is not None:
            q, k = q[:, heads], k[:, heads]
        logits = torch.matmul(q, k.transpose(-1, -2)).float() * call.scale  # (R, H, Lq, |E|)
        top = logits.amax(dim=-1, keepdim=True)
        mass = torch.matmul((logits - top).exp(), idx["onehot"])  # (R, H, Lq, G): Σ exp over each group
        scores = (mass.log() + top).mean(dim=1)
        return scores.argmax(dim=-1)


__all__ = ["AttentionModulation"]
