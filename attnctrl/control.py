"""The `Control` protocol: what every attention-control method implements.

A control says *where* it acts (`layers`, a selector; `steps`, a step range) and overrides any of
the hooks below. Hooks it does not override cost nothing: the processors only call the hooks a
control actually defines, and a layer without an active control runs the stock processor.

Attention level (called by the processors, for the layers the control selected):
    qkv(call)          edit ``call.q / call.k / call.v`` in place (e.g. AdaIN, shared K/V).
    bias(call)         return an additive logits mask (broadcastable to B×H×Lq×Lk) or None.
    reads(call)        the block of probabilities an observer reads (`attention_block.ProbsBlock`) or None;
    observe(call, p)   read that block (float32), computed in bounded memory while the layer
                       output stays the fused kernel's (maps, masks from attention).
    probs(call, p)     read/edit the full explicit probabilities; only when `needs_probs(call)`.
    out(call, o)       edit the per-head output (B×H×Lq×D), e.g. perturbation (1−u)·o + u·v.
    replaced_rows(call) rows whose output `out` will replace whole (they are not computed).
Loop level (called by `ControlledPipeline`; the run comes first, ``run.state`` is the step):
    branches(run)                        extra batch branches, e.g. ``["perturbed"]``.
    branch_source(branch)                which conditioning a branch uses ("cond" or "uncond").
    combine(run, preds, guided)          return the new guided prediction (composes in order).
    before_step(run, latents, denoise)   latent update before the step (e.g. A&E optimisation).
    after_step(run, latents)             observe the new latents.
Run lifetime:
    begin(run) / end(run)                set up and tear down per-run state (kept in ``run.store[self]``).
    result(run)                          a value placed on the output (``out.maps`` for maps).

What a control does to a layer (`EFFECTS`): each control's `layer_effects()` is what its hooks say
(`HOOK_EFFECTS`) refined by what it declares in `effects`; `plan.build_plan` refuses two controls on
one layer whose effects conflict (`plan.CONFLICTS`), since their order would silently change meaning.

A control object is configuration; what one run needs lives on the run (``run.store[self]``),
never on the control, so one control object serves any number of runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .params import validating
from .selectors import SelectorLike

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .attention import AttentionCall
    from .attention_block import ProbsBlock
    from .state import RunContext, StepState

HOOKS = ("qkv", "bias", "observe", "probs", "out")
#: hooks only the denoising loop calls (`ac.attach` refuses controls that need them)
LOOP_HOOKS = ("branches", "combine", "before_step", "after_step")
_IMPLEMENTS: dict[tuple[type, str], bool] = {}

#: the fixed vocabulary of what a control does to a layer it is planned on
EFFECTS: dict[str, str] = {
    "edits_qkv": "edits q/k/v in place, keeping their meaning (e.g. AdaIN toward a reference's statistics)",
    "replaces_kv": "replaces the layer's own keys/values by another row's (MutualSelfAttention)",
    "extends_kv": "appends keys/values to the layer's own (SharedAttention, IsolationReposition's sharing)",
    "edits_values": "rewrites the layer's values (StructuredGuidance)",
    "edits_scale": "changes the softmax scale / temperature (AttentionModulation's τ)",
    "bias": "adds an additive logits bias (masks, weights, −∞ isolation)",
    "reads_probs": "reads the explicit probabilities without changing the layer's output",
    "edits_probs": "edits the explicit probabilities",
    "edits_out": "edits or replaces rows of the per-head output (PAG, exact reference rows)",
    "adds_branch": "adds a batch branch to the denoiser call (PAG's perturbed branch)",
}
_QKV_EFFECTS = frozenset({"edits_qkv", "replaces_kv", "extends_kv", "edits_values", "edits_scale"})
#: hook -> (the effect an implemented hook implies, the declared effects that already describe it)
HOOK_EFFECTS: dict[str, tuple[str, frozenset[str]]] = {
    "qkv": ("edits_qkv", _QKV_EFFECTS),
    "bias": ("bias", frozenset({"bias"})),
    "observe": ("reads_probs", frozenset({"reads_probs", "edits_probs"})),
    "probs": ("edits_probs", frozenset({"reads_probs", "edits_probs"})),  # "reads_probs" if `observes_only`
    "out": ("edits_out", frozenset({"edits_out"})),
    "replaced_rows": ("edits_out", frozenset({"edits_out"})),
    "branches": ("adds_branch", frozenset({"adds_branch"})),
}


def _check_effects(owner: str, effects: frozenset[str]) -> None:
    unknown = sorted(set(effects) - EFFECTS.keys())
    if unknown:
        raise ValueError(f"{owner}.effects: unknown effect(s) {unknown}; the vocabulary is {sorted(EFFECTS)}")


class Control:
    """Base class of all controls. Subclasses set `name`, `default_layers` and override hooks."""

    name: str = "control"
    default_layers: SelectorLike = "self"
    #: what this control does to a layer that its hooks alone do not say (names from `EFFECTS`), e.g.
    #: ``frozenset({"replaces_kv"})``; a property where it depends on the configuration
    effects: frozenset[str] = frozenset()
    #: names of controls this one cannot share a layer with, beyond what `effects` imply (checked before step 1)
    exclusive_with: tuple[str, ...] = ()
    #: key on the pipeline output under which `result()` is returned (None: not returned)
    result_key: str | None = None
    #: True if `probs` only reads the probabilities (the layer output then stays SDPA's)
    observes_only: bool = False

    def __init__(self, layers: SelectorLike | None = None, steps: tuple[float, float] | None = None):
        self.layers = self.default_layers if layers is None else layers
        self.steps = steps

    # ---- where and when ----------------------------------------------------------------------
    def step_range(self, num_steps: int) -> tuple[int, int]:
        """[start, stop) step indices; floats in [0, 1] are fractions of `num_steps`."""
        if self.steps is None:
            return 0, num_steps
        lo, hi = self.steps
        conv = lambda x: int(round(x * num_steps)) if isinstance(x, float) and 0.0 <= x <= 1.0 else int(x)
        return conv(lo), conv(hi)

    def active(self, state: StepState | None) -> bool:
        """Whether step `state` is in this control's step window (`steps`). Not overridden: other
        conditions for the attention hooks are `attends(run)`."""
        if state is None or self.steps is None:
            return True
        lo, hi = self.step_range(state.num_steps)
        return lo <= state.index < hi

    def attends(self, run: RunContext) -> bool:
        """Whether this control's attention hooks run on the current call (processors ask once per
        layer call). Default: inside the step window. Overrides name their condition, e.g. "only in
        the latent optimiser's gradient passes"."""
        return self.active(run.state)

    def implements(self, hook: str) -> bool:
        """Whether this control overrides `hook` (so the processor or loop must call it); a loop hook
        only if `loop_hooks()` names it. Overriding is cached per class."""
        if hook in LOOP_HOOKS:
            return hook in self.loop_hooks()
        return self._overrides(hook)

    def _overrides(self, hook: str) -> bool:
        key = (type(self), hook)
        found = _IMPLEMENTS.get(key)
        if found is None:
            found = _IMPLEMENTS[key] = getattr(type(self), hook) is not getattr(Control, hook)
        return found

    def loop_hooks(self) -> tuple[str, ...]:
        """The loop hooks this control needs for its settings. Default: those its class overrides; a
        control narrows it when some settings need none (then it also runs under `ac.attach`)."""
        return tuple(h for h in LOOP_HOOKS if self._overrides(h))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None:  # every argument is checked against its declaration (`attnctrl.params`)
            cls.__init__ = validating(init)  # type: ignore[method-assign]
        declared = cls.__dict__.get("effects")
        if isinstance(declared, frozenset):  # a typo fails at import; a property is checked at planning
            _check_effects(cls.__name__, declared)

    def layer_effects(self) -> frozenset[str]:
        """What this control does to each layer it is planned on: the declared `effects`, plus for
        every implemented hook (`HOOK_EFFECTS`) that no declared effect describes, the effect it
        implies (`probs`: "reads_probs" if `observes_only`, else "edits_probs")."""
        declared = frozenset(self.effects)
        _check_effects(type(self).__name__, declared)
        found = set(declared)
        for hook, (implied, described_by) in HOOK_EFFECTS.items():
            if self.implements(hook) and not declared & described_by:
                found.add("reads_probs" if hook == "probs" and self.observes_only else implied)
        return frozenset(found)

    def check_layers(self, picked: list) -> None:
        """Validate the layers a selector picked (``[(LayerInfo, heads), ...]``); raise ValueError if unfit."""
        return None

    def narrow_layers(self, picked: list, grid: tuple[int, int]) -> list:
        """Narrow the layers the selector picked (``[(LayerInfo, heads), ...]``) for an input `grid`,
        e.g. to the one resolution a loss reads. Default: keep them all."""
        return picked

    def needs_probs(self, call: AttentionCall) -> bool:
        """Explicit probabilities are computed on a layer only if a control there says so."""
        return self.implements("probs")

    # ---- attention-level hooks ------------------------------------------------------------------
    def qkv(self, call: AttentionCall) -> None:
        return None

    def reads(self, call: AttentionCall) -> ProbsBlock | None:
        """The block of this layer's probabilities `observe` reads on this call (None: nothing)."""
        return None

    def observe(self, call: AttentionCall, block: torch.Tensor) -> None:
        """Read the block `reads` declared: float32, (rows, queries, keys) averaged over its heads
        (or (rows, heads, queries, keys)), normalised over all the layer's keys."""
        return None

    def bias(self, call: AttentionCall) -> torch.Tensor | None:
        return None

    def probs(self, call: AttentionCall, p: torch.Tensor) -> torch.Tensor:
        return p

    def out(self, call: AttentionCall, o: torch.Tensor) -> torch.Tensor:
        return o

    def replaced_rows(self, call: AttentionCall) -> slice | None:
        """Batch rows whose attention output `out` replaces whole: the layer skips computing them."""
        return None

    # ---- loop-level hooks -----------------------------------------------------------------------
    def branches(self, run: RunContext) -> Sequence[str]:
        return ()

    def branch_source(self, branch: str) -> str:
        return "cond"

    def combine(self, run: RunContext, preds: dict, guided: torch.Tensor) -> torch.Tensor:
        return guided

    def before_step(
        self, run: RunContext, latents: torch.Tensor, denoise: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        return latents

    def after_step(self, run: RunContext, latents: torch.Tensor) -> None:
        return None

    # ---- lifetime -------------------------------------------------------------------------------
    def begin(self, run: RunContext) -> None:
        return None

    def end(self, run: RunContext) -> None:
        return None

    def result(self, run: RunContext) -> Any:
        return None

    def __repr__(self) -> str:
        """The class and the arguments it was built with (`attnctrl.params`), e.g. ``PAG(scale=2.0)``."""
        given = self.__dict__.get("_given", {})
        return f"{type(self).__name__}({', '.join(f'{k}={_short(v)}' for k, v in given.items())})"


def _short(value: Any) -> str:
    """repr, with tensors and images as their shape."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)):
        return f"<{type(value).__name__} {'×'.join(map(str, shape))}>"
    size = getattr(value, "size", None)
    if isinstance(size, tuple) and hasattr(value, "mode"):  # a PIL image
        return f"<image {size[0]}×{size[1]}>"
    return repr(value)


Control.__init__ = validating(Control.__init__)  # type: ignore[method-assign]
