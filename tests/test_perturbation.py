"""PAG / HeadPerturbation: parity with diffusers' PAG pipelines and SoftPAG's stated properties."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import attnctrl as ac
import attnctrl.attention as attention
from attnctrl.control import Control
from attnctrl.pipelines import ControlledPipeline
from conftest import call_kwargs, stock_latents

PROMPT = "a red car and a white sheep"
PAG_PIPELINES = {"tiny-sd": StableDiffusionPAGPipeline, "tiny-sdxl": StableDiffusionXLPAGPipeline}


def diffusers_pag(tiny, name, layers, **kw):
    pag = PAG_PIPELINES.get(name, StableDiffusion3PAGPipeline).from_pipe(tiny(name), pag_applied_layers=layers)
    pag.set_progress_bar_config(disable=True)
    return pag(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize(
    "guidance, adaptive, rescale", [(5.0, 0.0, 0.0), (1.0, 0.0, 0.0), (5.0, 0.002, 0.0), (5.0, 0.0, 0.7)]
)
def test_pag_matches_diffusers_unet(tiny, name, guidance, adaptive, rescale):
    """rescale > 0: diffusers adds the PAG term, then rescales the sum toward ε_c (rescaling first differs by 0.09)."""
    kw = call_kwargs(name, guidance_scale=guidance, guidance_rescale=rescale)
    ref = diffusers_pag(tiny, name, ["mid"], pag_scale=3.0, pag_adaptive_scale=adaptive, **kw)
    out = ControlledPipeline(tiny(name))(
        PROMPT, seed=0, controls=[ac.PAG("mid", scale=3.0, adaptive_scale=adaptive)], **kw
    )
    assert (out.images - ref).abs().max().item() <= 1e-5
    assert (out.images - stock_latents(tiny(name), PROMPT, **kw)).abs().max().item() > 1e-3  # PAG did something


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_pag_matches_diffusers_sd3(tiny, guidance):
    kw = call_kwargs("tiny-sd3", guidance_scale=guidance)
    ref = diffusers_pag(tiny, "tiny-sd3", ["transformer_blocks.1"], pag_scale=3.0, **kw)
    out = ControlledPipeline(tiny("tiny-sd3"))(PROMPT, seed=0, controls=[ac.PAG("transformer_blocks.1")], **kw)
    assert (out.images - ref).abs().max().item() <= 1e-5


class Preds(Control):
    """Records the branch predictions of the first step."""

    def begin(self, run):
        self.first = None

    def combine(self, run, preds, guided):
        if run.state.index == 0:
            self.first = {k: v.clone() for k, v in preds.items()}
        return guided


def test_qk_norm_unperturbed_branches_equal_plain_forward_and_dual_attention_runs(tiny):
    pipe = ControlledPipeline(tiny("tiny-sd35"))
    kw = call_kwargs("tiny-sd35")
    plain, perturbed = Preds(), Preds()
    pipe(PROMPT, seed=0, controls=[plain], **kw)
    # block 0 of tiny-sd35 has both the joint `attn` (QK-norm) and the dual self-attention `attn2`
    out = pipe(PROMPT, seed=0, controls=[ac.PAG("transformer_blocks.0"), perturbed], **kw)
    for branch in ("uncond", "cond"):
        assert (perturbed.first[branch] - plain.first[branch]).abs().max().item() <= 1e-5
    assert (perturbed.first["perturbed"] - perturbed.first["cond"]).abs().max().item() > 1e-4
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("settings", [{"softness": 0.0}, {"scale": 0.0}])
def test_zero_softness_or_scale_is_stock(tiny, name, settings):
    kw = call_kwargs(name)
    out = ControlledPipeline(tiny(name))(
        PROMPT, seed=0, controls=[ac.HeadPerturbation("self,heads=0", **settings)], **kw
    )
    assert (out.images - stock_latents(tiny(name), PROMPT, **kw)).abs().max().item() <= 1e-5


class Check(Control):
    """Placed after HeadPerturbation: verifies its output against (1−u)·AV + u·V on one layer."""

    default_layers = "name=down_blocks.1.attentions.0.transformer_blocks.0.attn1"

    def __init__(self, u, heads):
        super().__init__()
        self.u, self.heads, self.checked = u, heads, 0

    def out(self, call, o):
        full = F.scaled_dot_product_attention(call.q, call.k, call.v)
        ptb = call.run.layout.rows("perturbed")
        expected = full.clone()
        for h in self.heads:
            expected[ptb, h] = (1 - self.u) * full[ptb, h] + self.u * call.v[ptb, h]
        assert torch.allclose(o, expected, atol=1e-6)
        assert torch.equal(o[: ptb.start], full[: ptb.start]) or torch.allclose(
            o[: ptb.start], full[: ptb.start], atol=1e-7
        )
        self.checked += 1
        return o


def test_perturbed_heads_follow_softpag_and_only_they_change(tiny):
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"  # 4 heads
    check = Check(u=0.4, heads=[1, 3])
    ControlledPipeline(tiny("tiny-sd"))(
        PROMPT,
        seed=0,
        controls=[ac.HeadPerturbation([(layer, 1), (layer, 3)], softness=0.4), check],
        **call_kwargs("tiny-sd"),
    )
    assert check.checked == 3


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sd3", "tiny-flux"])
def test_identity_perturbation_never_calls_explicit_softmax(tiny, name, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("explicit softmax on the perturbed branch")

    monkeypatch.setattr(attention, "attention_probs", forbidden)
    out = ControlledPipeline(tiny(name))(
        PROMPT, seed=0, controls=[ac.HeadPerturbation("self", softness=0.7)], **call_kwargs(name)
    )
    assert torch.isfinite(out.images).all()


def test_flux_has_only_the_perturbed_extra_branch(tiny):
    spy = Preds()
    out = ControlledPipeline(tiny("tiny-flux"))(
        PROMPT, seed=0, controls=[ac.PAG("single_transformer_blocks.1"), spy], **call_kwargs("tiny-flux")
    )
    assert sorted(spy.first) == ["cond", "perturbed"]
    assert (out.images - stock_latents(tiny("tiny-flux"), PROMPT, **call_kwargs("tiny-flux"))).abs().max().item() > 1e-4


def test_maps_come_from_the_conditional_branch_only(tiny):
    kw = call_kwargs("tiny-sd", num_inference_steps=1)
    alone = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.AttentionMaps()], **kw)
    both = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.PAG("self"), ac.AttentionMaps()], **kw)
    for res, m in alone.maps.by_res.items():
        assert torch.allclose(both.maps.by_res[res], m, atol=1e-6)


def test_uniform_kind_mixes_toward_the_mean_value(tiny):
    class Mean(Check):
        def out(self, call, o):
            ptb = call.run.layout.rows("perturbed")
            full = F.scaled_dot_product_attention(call.q, call.k, call.v)
            mean = call.v[ptb].mean(dim=2, keepdim=True)
            assert torch.allclose(o[ptb], 0.5 * full[ptb] + 0.5 * mean, atol=1e-6)
            self.checked += 1
            return o

    check = Mean(0.5, [])
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    ControlledPipeline(tiny("tiny-sd"))(
        PROMPT,
        seed=0,
        controls=[ac.HeadPerturbation(f"name={layer}", softness=0.5, kind="uniform"), check],
        **call_kwargs("tiny-sd"),
    )
    assert check.checked == 3


def test_heads_from_json_file(tiny, tmp_path):
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"heads": [[layer, 0], [layer, 2]]}))
    kw = call_kwargs("tiny-sd")
    a = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.HeadPerturbation(str(path))], **kw)
    b = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.HeadPerturbation({layer: [0, 2]})], **kw)
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"heads": "mid,heads=9"}, ac.SelectorError, "heads"),
        ({"heads": [("mid_block.attentions.0.transformer_blocks.0.attn2", 0)]}, ValueError, "not self-attention"),
        ({"heads": "self", "scale": -1.0}, ValueError, "scale"),
        ({"heads": "self", "softness": 1.5}, ValueError, "softness"),
        ({"heads": "self", "kind": "zero"}, ValueError, "kind"),
        ({"heads": "missing.json"}, ValueError, "does not exist"),
    ],
)
def test_bad_input(tiny, kwargs, error, message):
    with pytest.raises(error, match=message):
        ControlledPipeline(tiny("tiny-sd"))(
            PROMPT, seed=0, controls=[ac.HeadPerturbation(**kwargs)], **call_kwargs("tiny-sd")
        )


def test_outside_the_step_range_guidance_is_off(tiny):
    kw = call_kwargs("tiny-sd", num_inference_steps=4)
    stock = stock_latents(tiny("tiny-sd"), PROMPT, **kw)
    never = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.PAG("mid", steps=(0, 0))], **kw)
    late = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.PAG("mid", steps=(2, 4))], **kw)
    full = ControlledPipeline(tiny("tiny-sd"))(PROMPT, seed=0, controls=[ac.PAG("mid")], **kw)
    assert (never.images - stock).abs().max().item() <= 1e-5
    assert (late.images - stock).abs().max().item() > 1e-4 and (late.images - full.images).abs().max().item() > 1e-4
