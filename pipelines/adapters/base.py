"""The adapter contract: what the generic loop needs from one model family.

An adapter reuses the wrapped diffusers pipeline's own `encode_prompt`, `prepare_latents`,
scheduler and VAE, so a run without controls computes what the stock `__call__` computes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Prepared:
    """Everything the loop needs for one run, produced by `Adapter.prepare`.

    `cond` / `uncond` hold the model keyword arguments that have one row per image (tensors, or
    nested dicts of tensors) for the conditional / unconditional branch; `shared` holds those
    that are the same for every row; per-row keys starting with "_" are inputs the adapter itself
    consumes in `predict` (e.g. inpainting's mask channels). `grid` is the denoiser's image-token grid (h, w).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    num_steps: int
    cond: dict
    uncond: dict | None
    shared: dict
    guidance_scale: float
    grid: tuple[int, int]
    prompts: list[str]
    images: int
    guidance_rescale: float = 0.0
    text_len: int | None = None
    extra_step: dict = field(default_factory=dict)
    decode: dict = field(default_factory=dict)
    num_warmup: int = 0
    #: tensors of one pipeline kind that are not model inputs (e.g. inpainting's image latents and mask)
    kind: dict = field(default_factory=dict)

    @property
    def cfg(self) -> bool:
        return self.uncond is not None


def call_defaults(pipe) -> dict[str, Any]:
    """Default keyword arguments of the pipeline's own `__call__` (so defaults match stock)."""
    sig = inspect.signature(type(pipe).__call__)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k != "self" and p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    }


def cat_rows(parts: list) -> Any:
    """Concatenate per-row model inputs (tensors or nested dicts of tensors) along dim 0."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: cat_rows([p[k] for p in parts]) for k in first}
    if first is None:
        return None
    return torch.cat(parts) if len(parts) > 1 else first


def prompt_list(prompt, n_from_embeds: int | None = None) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt is None:
        return [""] * (n_from_embeds or 1)
    return list(prompt)


class Adapter:
    """Family adapter: subclasses implement the five methods below."""

    family = "base"
    #: the pipeline kind (text2image, img2img, inpaint); `required` are call arguments it cannot run without
    kind = "text2image"
    required: tuple[str, ...] = ()
    #: stock `__call__` arguments this adapter does not implement (error if the user sets them)
    unsupported: tuple[str, ...] = ()

    def prepare(self, pipe, kw: dict) -> Prepared:
        raise NotImplementedError

    def model_input(self, pipe, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def predict(self, pipe, x: torch.Tensor, t: torch.Tensor, rows: dict, shared: dict) -> torch.Tensor:
        raise NotImplementedError

    def step(self, pipe, prep: Prepared, noise: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return pipe.scheduler.step(noise, t, latents, **prep.extra_step, return_dict=False)[0]

    def step_inputs(self, prep: Prepared, i: int) -> dict:
        """Shared model inputs of step `i` on top of `prep.shared` (ControlNet's scale); none here."""
        return {}

    def after_step(self, pipe, prep: Prepared, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The kind's own latent update after scheduler step `i` (inpainting's blend); identity here."""
        return latents

    def decode(self, pipe, prep: Prepared, latents: torch.Tensor, output_type: str):
        """Returns (images, nsfw flags or None)."""
        raise NotImplementedError

    def encode_texts(self, pipe, texts: list[str]) -> torch.Tensor:
        """The pipeline's own prompt embeddings of `texts` (no CFG, one image each): (len, L, C).

        Run facts (`RunContext.text.encode`) for controls that encode text pieces of their own,
        e.g. StructuredGuidance's noun phrases; the LoRA scale and clip skip of the call apply."""
        clip_skip = getattr(pipe, "_clip_skip", None)
        lora_scale = (getattr(pipe, "_cross_attention_kwargs", None) or {}).get("scale")
        return pipe.encode_prompt(
            prompt=texts,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=clip_skip,
            lora_scale=lora_scale,
        )[0]
