"""Shared test setup: nothing in the test suite may reach the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import functools

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and with other processes on the same cores
# OpenMP threads waiting on each other make every run 10-100x slower.
torch.set_num_threads(1)

FAMILY_MODELS = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux"]


@functools.cache
def _cached(name: str):
    from attnctrl.models.tiny import build_tiny

    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny():
    """`tiny(name)` → a cached tiny diffusers pipeline (tests must leave it as they found it)."""
    return _cached


def call_kwargs(name: str, **extra) -> dict:
    """Small, fast call kwargs for a tiny model (+ overrides)."""
    from attnctrl.models.tiny import TINY_DEFAULTS

    kw = {**TINY_DEFAULTS.get(name, {}), "num_inference_steps": 3, "output_type": "latent"}
    kw.update(extra)
    return kw


def stock_latents(pipe, prompt, seed=0, **kw):
    """Final latents of the plain diffusers pipeline call."""
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw).images


def processors_of(pipe) -> dict:
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    return dict(denoiser.attn_processors)


def pytest_collection_modifyitems(config, items):
    """The fast set first: tests marked `slow` or `browser` run after all the others (stable order)."""
    late = lambda item: item.get_closest_marker("slow") is not None or item.get_closest_marker("browser") is not None
    items.sort(key=late)
