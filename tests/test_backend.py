"""Controlled FLUX layers keep the user's attention backend (``set_attention_backend``) where the
call needs nothing it cannot give, and say once when a layer falls back to PyTorch's SDPA."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend

import attnctrl as ac
from attnctrl.models.tiny import build_tiny
from attnctrl.pipelines import ControlledPipeline
from tests.conftest import call_kwargs

PROMPTS = ["a red car and a white sheep", "a blue car and a black sheep"]
MATH = AttentionBackendName._NATIVE_MATH


@pytest.fixture
def math_backend(monkeypatch):
    """A fresh tiny FLUX on the ``_native_math`` backend, and the list of calls that backend served."""
    pipe = build_tiny("tiny-flux")
    # set_attention_backend also makes the backend the process-wide default: put that back afterwards
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    pipe.transformer.set_attention_backend(MATH.value)
    served: list[tuple] = []
    original = _AttentionBackendRegistry._backends[MATH]

    def counting(**kw):
        served.append(tuple(kw["query"].shape))
        return original(**kw)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, MATH, counting)
    return ControlledPipeline(pipe), served


def test_a_controlled_layer_runs_on_the_users_backend(math_backend):
    cp, served = math_backend
    kw = call_kwargs("tiny-flux", num_inference_steps=2)
    # self-attention temperature edits the keys only (no mask): the backend can run every layer
    tau = lambda: ac.AttentionModulation(temperature=0.5, temperature_steps=(0, 2))
    served.clear()
    out = cp(PROMPTS, seed=0, controls=[tau()], **kw).latents
    assert len(served) == 2 * len(cp.layers())  # every layer, controlled or not, each step
    native = ControlledPipeline(build_tiny("tiny-flux"))
    with attention_backend(AttentionBackendName.NATIVE.value):  # PyTorch's SDPA, for the reference
        served.clear()
        ref = native(PROMPTS, seed=0, controls=[tau()], **kw).latents
        stock = native(PROMPTS, seed=0, **kw).latents
        assert served == []
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out - stock).abs().max() > 1e-3  # and the control did act on the backend's layers


def test_a_layer_that_needs_probabilities_falls_back_and_says_so_once(math_backend, caplog):
    cp, served = math_backend
    served.clear()
    with caplog.at_level(logging.WARNING, logger="attnctrl"):
        out = cp(PROMPTS[0], seed=0, controls=[ac.AttentionMaps()], **call_kwargs("tiny-flux", num_inference_steps=2))
    said = [r for r in caplog.records if "instead of the _native_math attention backend" in r.getMessage()]
    assert len(said) <= 1 and out.maps is not None
    assert served == []  # every layer reads maps: none ran on the backend
