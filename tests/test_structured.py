"""StructuredGuidance (StructureDiffusion, Feng et al. ICLR 2023): one key, many values."""

import pytest
import torch

import attnctrl as ac
from attnctrl.control import Control
from attnctrl.controls.registry import CONTROLS, parse_control
from attnctrl.pipelines import ControlledPipeline
from attnctrl.tokens import TokenError
from conftest import call_kwargs, processors_of, stock_latents

PROMPT = "a red car and a white sheep"
PROMPTS = [PROMPT, "a small red circle above a big blue square"]
PHRASES = [["a red car", "a white sheep"], ["a small red circle", "a big blue square"]]
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize(
    "phrases, prompt",
    [([], PROMPT), (None, "a red car"), (None, "cats")],  # none given; the whole prompt; one-word phrase only
)
@pytest.mark.parametrize("conjunction", [False, True])
def test_no_phrases_is_stock(tiny, name, phrases, prompt, conjunction):
    kw = call_kwargs(name)
    control = ac.StructuredGuidance(phrases=phrases, backend="rules", conjunction=conjunction)
    out = ControlledPipeline(tiny(name))(prompt, seed=0, controls=[control], **kw)
    assert (out.images - stock_latents(tiny(name), prompt, **kw)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("conjunction", [False, True])
def test_without_cfg_only_the_cond_branch_exists_and_changes(tiny, conjunction):
    kw = call_kwargs("tiny-sd", guidance_scale=1.0)
    out = ControlledPipeline(tiny("tiny-sd"))(
        PROMPT, seed=0, controls=[ac.StructuredGuidance(["a white sheep"], conjunction=conjunction)], **kw
    )
    assert (out.images - stock_latents(tiny("tiny-sd"), PROMPT, **kw)).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_phrases_change_the_output(tiny, name):
    kw = call_kwargs(name)
    stock = stock_latents(tiny(name), PROMPT, **kw)
    given = ControlledPipeline(tiny(name))(
        PROMPT, seed=0, controls=[ac.StructuredGuidance(["a red car", "a white sheep"])], **kw
    )
    auto = ControlledPipeline(tiny(name))(PROMPT, seed=0, controls=[ac.StructuredGuidance(backend="rules")], **kw)
    assert (given.images - stock).abs().max().item() > 1e-3
    assert torch.equal(given.images, auto.images)  # the chunker finds the same two phrases


# ---- an independent re-derivation of Eq. 4 on one layer --------------------------------------------


def _encode(pipe, family, text):
    """Text-encoder hidden states of `text` as the diffusers pipelines compute them (77 tokens)."""

    def ids(tok):
        return tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    if family == "sd":
        return pipe.text_encoder(ids(pipe.tokenizer))[0][0]
    parts = [
        enc(ids(tok), output_hidden_states=True).hidden_states[-2][0]
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    ]
    return torch.cat(parts, dim=-1)


def _aligned(pipe, family, prompt, phrase):
    """The reference's `align_sequence`: the prompt's embeddings with the phrase's own tokens
    (after BOS) written over the positions where the phrase's tokens occur in the prompt's tokens."""
    full = _encode(pipe, family, prompt).clone()
    toks, ptoks = pipe.tokenizer.tokenize(prompt), pipe.tokenizer.tokenize(phrase)
    m = len(ptoks)
    start = next(s for s in range(len(toks)) if toks[s : s + m] == ptoks)
    full[start + 1 : start + 1 + m] = _encode(pipe, family, phrase)[1 : 1 + m]
    return full


class Check(Control):
    """Placed before StructuredGuidance on one layer: records V, then checks the layer output."""

    def __init__(self, pipe, family, prompts, phrases, per_prompt, layer=LAYER):
        super().__init__(layers=f"name={layer}")
        self.pipe, self.family, self.checked = pipe, family, 0
        self.seqs = [
            [_encode(pipe, family, p)] + [_aligned(pipe, family, p, q) for q in ph] for p, ph in zip(prompts, phrases)
        ]
        self.per_prompt = per_prompt

    def qkv(self, call):
        self.v_before = call.v.clone()

    def out(self, call, o):
        layout = call.run.layout
        unc, cond = layout.rows("uncond"), layout.rows("cond")
        h = call.q.shape[1]
        # unconditional rows: plain attention with the original values
        plain = torch.softmax(call.q[unc] @ call.k[unc].transpose(-1, -2) * call.scale, dim=-1) @ self.v_before[unc]
        assert torch.allclose(o[unc], plain, atol=1e-5)
        # conditional rows: softmax(Q K_0ᵀ) · mean_i V_i, one key, many values
        for r in range(cond.stop - cond.start):
            row = cond.start + r
            probs = torch.softmax(call.q[row] @ call.k[row].transpose(-1, -2) * call.scale, dim=-1)
            values = [
                call.module.to_v(s).view(s.shape[0], h, -1).transpose(0, 1) for s in self.seqs[r // self.per_prompt]
            ]
            expected = sum(probs @ v for v in values) / len(values)
            assert torch.allclose(o[row], expected, atol=1e-5), (o[row] - expected).abs().max()
            # the key is the full prompt's
            k0 = call.module.to_k(self.seqs[r // self.per_prompt][0]).view(77, h, -1).transpose(0, 1)
            assert torch.allclose(call.k[row], k0, atol=1e-5)
        self.checked += 1
        return o


@pytest.mark.parametrize("name, family", [("tiny-sd", "sd"), ("tiny-sdxl", "sdxl")])
def test_layer_output_follows_one_key_many_values(tiny, name, family):
    pipe = tiny(name)
    with torch.no_grad():
        check = Check(pipe, family, PROMPTS, PHRASES, per_prompt=2)
    ControlledPipeline(pipe)(
        PROMPTS,
        seed=0,
        num_images_per_prompt=2,
        controls=[check, ac.StructuredGuidance(phrases=PHRASES)],
        **call_kwargs(name, num_inference_steps=2),
    )
    assert check.checked == 2


def _all_aligned(pipe, family, prompt, phrases):
    """The reference's `single_align`: every phrase written into one copy of the prompt's sequence."""
    full = _encode(pipe, family, prompt).clone()
    toks = pipe.tokenizer.tokenize(prompt)
    for phrase in phrases:
        ptoks = pipe.tokenizer.tokenize(phrase)
        m = len(ptoks)
        start = next(s for s in range(len(toks)) if toks[s : s + m] == ptoks)
        full[start + 1 : start + 1 + m] = _encode(pipe, family, phrase)[1 : 1 + m]
    return full


class Record(Control):
    def __init__(self):
        super().__init__(layers=f"name={LAYER}")

    def qkv(self, call):
        self.v_before = call.v.clone()


class CheckConjunction(Check):
    """Placed after StructuredGuidance (its `out` must run after the control's): mean over keys
    (the prompt's, each aligned phrase's) of softmax(Q K_jᵀ)·V(all phrases aligned)."""

    def __init__(self, pipe, family, prompts, phrases, per_prompt, record):
        super().__init__(pipe, family, prompts, phrases, per_prompt)
        self.single = [_all_aligned(pipe, family, p, ph) for p, ph in zip(prompts, phrases)]
        self.record = record

    def qkv(self, call):
        self.v_before = self.record.v_before

    def out(self, call, o):
        cond = call.run.layout.rows("cond")
        unc = call.run.layout.rows("uncond")
        h = call.q.shape[1]
        plain = torch.softmax(call.q[unc] @ call.k[unc].transpose(-1, -2) * call.scale, dim=-1) @ self.v_before[unc]
        assert torch.allclose(o[unc], plain, atol=1e-5)
        for r in range(cond.stop - cond.start):
            row, b = cond.start + r, r // self.per_prompt
            v = call.module.to_v(self.single[b]).view(77, h, -1).transpose(0, 1)
            keys = [call.module.to_k(s).view(77, h, -1).transpose(0, 1) for s in self.seqs[b]]
            expected = sum(
                torch.softmax(call.q[row] @ k.transpose(-1, -2) * call.scale, dim=-1) @ v for k in keys
            ) / len(keys)
            assert torch.allclose(o[row], expected, atol=1e-5), (o[row] - expected).abs().max()
        self.checked += 1
        return o


@pytest.mark.parametrize("name, family", [("tiny-sd", "sd"), ("tiny-sdxl", "sdxl")])
def test_conjunction_mode_follows_many_keys_one_value(tiny, name, family):
    pipe = tiny(name)
    phrases = [["a red car", "a white sheep"], ["a big blue square"]]  # prompts with different numbers of phrases
    with torch.no_grad():
        record = Record()
        check = CheckConjunction(pipe, family, PROMPTS, phrases, per_prompt=1, record=record)
    controls = [record, ac.StructuredGuidance(phrases=phrases, conjunction=True), check]
    out = ControlledPipeline(pipe)(PROMPTS, seed=0, controls=controls, **call_kwargs(name, num_inference_steps=2))
    assert check.checked == 2
    assert torch.isfinite(out.images).all()


def test_one_phrase_list_serves_every_prompt_and_uncond_rows_untouched(tiny):
    pipe = tiny("tiny-sd")
    prompts = [PROMPT, "a white sheep next to a red car"]
    with torch.no_grad():
        check = Check(
            pipe, "sd", prompts, [["a red car", "a white sheep"], ["a white sheep", "a red car"]], per_prompt=1
        )
    ControlledPipeline(pipe)(
        prompts,
        seed=0,
        controls=[check, ac.StructuredGuidance(["a red car", "a white sheep"])],
        **call_kwargs("tiny-sd", num_inference_steps=1),
    )
    assert check.checked == 1


def test_phrase_at_the_prompt_start_changes_nothing(tiny):
    # CLIP's causal mask: "a red car" encoded alone has the same token embeddings as at the prompt's start
    kw = call_kwargs("tiny-sd")
    out = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.StructuredGuidance(["a red car"])], **kw)
    assert (out.images - stock_latents(tiny("tiny-sd"), PROMPT, **kw)).abs().max().item() <= 1e-5


def test_heads_restriction_changes_only_those_heads(tiny):
    # (a phrase at the very start of the prompt would change nothing: CLIP's causal mask gives its
    # tokens the same embeddings alone as in the prompt)
    pipe = tiny("tiny-sd")

    class Heads(Control):
        def __init__(self):
            super().__init__(layers=f"name={LAYER}")

        def qkv(self, call):
            self.before = call.v.clone()

        def out(self, call, o):
            cond = call.run.layout.rows("cond")
            assert torch.equal(call.v[:, 0], self.before[:, 0]) and torch.equal(call.v[:, 2:], self.before[:, 2:])
            assert not torch.equal(call.v[cond, 1], self.before[cond, 1])
            self.ok = True
            return o

    spy = Heads()
    ControlledPipeline(pipe)(
        PROMPT,
        seed=0,
        controls=[spy, ac.StructuredGuidance(["a white sheep"], layers=f"name={LAYER},heads=1")],
        **call_kwargs("tiny-sd", num_inference_steps=1),
    )
    assert spy.ok


# ---- composition, CLI, errors --------------------------------------------------------------------


def test_composes_with_attention_maps(tiny):
    kw = call_kwargs("tiny-sd")
    alone = ControlledPipeline(tiny("tiny-sd"))(
        PROMPT, seed=0, controls=[ac.StructuredGuidance(["a red car", "a white sheep"])], **kw
    )
    both = ControlledPipeline(tiny("tiny-sd"))(
        PROMPT, seed=0, controls=[ac.StructuredGuidance(["a red car", "a white sheep"]), ac.AttentionMaps()], **kw
    )
    assert (both.images - alone.images).abs().max().item() <= 1e-5  # maps only observe
    assert both.maps is not None and len(both.maps.by_res) > 0


@pytest.mark.parametrize("conjunction", [False, True])
def test_one_control_serves_runs_in_a_row_as_fresh_ones(tiny, conjunction):
    """The phrases, their aligned values and the per-layer projections are the run's: a second run
    with other prompts and another batch equals a fresh control's, and the control is left as it was."""
    pipe = ControlledPipeline(tiny("tiny-sd"))
    kw = call_kwargs("tiny-sd", num_inference_steps=2)
    make = lambda: ac.StructuredGuidance(backend="rules", conjunction=conjunction)
    reused = make()
    before = dict(vars(reused))
    first = pipe(PROMPT, seed=0, controls=[reused], **kw).images
    again = pipe(PROMPTS, seed=0, controls=[reused], num_images_per_prompt=2, **kw).images
    assert vars(reused).keys() == before.keys() and all(vars(reused)[k] is v for k, v in before.items())
    assert torch.equal(first, pipe(PROMPT, seed=0, controls=[make()], **kw).images)
    assert torch.equal(again, pipe(PROMPTS, seed=0, controls=[make()], num_images_per_prompt=2, **kw).images)
    assert (again - stock_latents(pipe.pipe, PROMPTS, num_images_per_prompt=2, **kw)).abs().max().item() > 1e-3


def test_cli_parsing():
    assert CONTROLS["structured"] is ac.StructuredGuidance
    c = parse_control("structured", ["phrases=a red car,a white sheep", "backend=rules", "conjunction=true"])
    assert isinstance(c, ac.StructuredGuidance)
    assert c.phrases == ["a red car", "a white sheep"] and c.backend == "rules" and c.conjunction
    assert parse_control("structured", []).phrases is None


class StepSpy(Control):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def after_step(self, run, latents):
        self.seen.append(run.state.index)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_joint_attention_models_refused_before_any_step(tiny, name):
    pipe = tiny(name)
    before = processors_of(pipe)
    spy = StepSpy()
    with pytest.raises(NotImplementedError, match="joint attention"):
        ControlledPipeline(pipe)(
            PROMPT, seed=0, controls=[spy, ac.StructuredGuidance(["a red car"])], **call_kwargs(name)
        )
    assert spy.seen == []
    assert processors_of(pipe) == before


@pytest.mark.parametrize(
    "kwargs, prompt, error, message",
    [
        ({"phrases": ["a blue car"]}, PROMPT, TokenError, "not a phrase"),
        ({"phrases": [["a red car"]]}, [PROMPT, PROMPT], ValueError, "one list per prompt"),
        ({"phrases": ["a red car"], "layers": "self"}, PROMPT, ValueError, "cross-attention"),
    ],
)
def test_bad_input_before_any_step(tiny, kwargs, prompt, error, message):
    pipe = tiny("tiny-sd")
    before = processors_of(pipe)
    spy = StepSpy()
    with pytest.raises(error, match=message):
        ControlledPipeline(pipe)(
            prompt, seed=0, controls=[spy, ac.StructuredGuidance(**kwargs)], **call_kwargs("tiny-sd")
        )
    assert spy.seen == [] and processors_of(pipe) == before


@pytest.mark.parametrize(
    "kwargs, message",
    [({"phrases": [""]}, "non-empty"), ({"backend": "nltk"}, "backend"), ({"min_words": 0}, "min_words")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ac.StructuredGuidance(**kwargs)


def test_attach_is_refused(tiny):
    with (
        pytest.raises(ValueError, match="ControlledPipeline"),
        ac.attach(tiny("tiny-sd"), [ac.StructuredGuidance(["a red car"])]),
    ):
        pass
