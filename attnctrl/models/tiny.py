"""Tiny deterministic random-weight pipelines of every supported model family.

They need no download: weights are drawn from a fixed seed on CPU in fp32 (identical on every call
and machine for a given torch version), tokenizers come from ``attnctrl.assets/tokenizers``
(``scripts/build_tokenizer_assets.py``). The architectures keep the features controls depend on
(several heads, cross-attention at two or more resolutions, SDXL's two text encoders and micro-
conditioning, SD3/SD3.5 joint attention with ``qk_norm`` and dual attention, FLUX double and single
stream blocks) at sizes as small as diffusers' own tests use. Outputs are noise: use these models
for tests, demos of the plumbing and benchmarks of overhead, not for pictures.

Every tiny model generates 64×64 px images from 32×32 latents by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_MODELS", "TINY_DEFAULTS", "build_tiny", "tokenizer_dir", "clip_tokenizer", "t5_tokenizer"]

TINY_MODELS: dict[str, str] = {
    "tiny-sd": "Stable Diffusion 1.x-style UNet (cross-attention at 32, 16 and 8 px latents), one CLIP encoder",
    "tiny-sdxl": "SDXL-style UNet (text_time micro-conditioning, 1-2 transformer layers per block), two CLIP encoders",
    "tiny-sd3": "SD3-style MMDiT (2 joint blocks), two CLIP encoders and T5, flow matching",
    "tiny-sd35": "SD3.5-style MMDiT (RMS qk-norm, dual self-attention in block 0), two CLIP encoders and T5",
    "tiny-flux": "FLUX.1-dev-style transformer (2 double + 2 single blocks, guidance embedding), CLIP and T5",
}

#: Recommended extra call kwargs. The T5 models would otherwise pad prompts to 256 (SD3) or 512
#: (FLUX) tokens; 32 tokens keep runs fast and still fit every ordinary prompt.
TINY_DEFAULTS: dict[str, dict[str, object]] = {
    "tiny-sd": {},
    "tiny-sdxl": {},
    "tiny-sd3": {"max_sequence_length": 32},
    "tiny-sd35": {"max_sequence_length": 32},
    "tiny-flux": {"max_sequence_length": 32},
}

_SAMPLE_SIZE = 32  # latent side; every VAE below has two blocks (scale factor 2) -> 64 px images
_TEXT_DIM = 32  # CLIP hidden size and projection size
_T5_DIM = 64  # >= two CLIP encoders concatenated (SD3 pads CLIP embeddings to the T5 width)


def tokenizer_dir(kind: str) -> Path:
    """Folder of an embedded tokenizer: ``kind`` is ``"clip"`` or ``"t5"``."""
    if kind not in ("clip", "t5"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'clip' or 't5'")
    return Path(str(files("attnctrl.assets") / "tokenizers" / kind))


def clip_tokenizer():
    """The embedded byte-level BPE CLIP tokenizer (77 positions)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir("clip"), model_max_length=77)


def t5_tokenizer():
    """The embedded SentencePiece T5 tokenizer (``<pad>`` = 0, ``</s>`` = 1)."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(tokenizer_dir("t5"))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and default to fp32 inside; restore the caller's RNG and dtype after."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def _clip_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        projection_dim=_TEXT_DIM,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip(tokenizer, seed: int, projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with _seeded(seed):
        return cls(_clip_config(tokenizer)).eval()


def _t5(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    # PretrainedConfig keywords that transformers 5's dataclass signature of T5Config leaves out
    # (its __post_init__ takes them)
    config_kwargs: dict[str, Any] = {"decoder_start_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False}
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_kwargs,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def _vae(seed: int, latent_channels: int, **config):
    # diffusers.models: mypy reads diffusers' top-level model names as its dummy classes
    from diffusers.models import AutoencoderKL

    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=2 * _SAMPLE_SIZE,
            **config,
        ).eval()


def _sd_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


def _build_sd():
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    with _seeded(0):
        unet = UNet2DConditionModel(
            sample_size=_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4, 4),  # diffusers' legacy name: the number of heads (head dim 16)
            norm_num_groups=8,
            cross_attention_dim=_TEXT_DIM,
        ).eval()
    return StableDiffusionPipeline(
        vae=_vae(1, 4, scaling_factor=0.18215),
        text_encoder=_clip(tokenizer, 2),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _build_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    time_dim = 8
    with _seeded(10):
        unet = UNet2DConditionModel(
            sample_size=_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),  # number of heads (legacy name)
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=True,
            norm_num_groups=8,
            cross_attention_dim=2 * _TEXT_DIM,  # both encoders' hidden states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + _TEXT_DIM,
        ).eval()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(11, 4, scaling_factor=0.13025),
        text_encoder=_clip(tokenizer, 12),
        text_encoder_2=_clip(tokenizer, 13, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sd3(v35: bool):
    # diffusers.models: mypy reads diffusers' top-level model names as its dummy classes
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.models import SD3Transformer2DModel

    seed = 30 if v35 else 20
    tokenizer, t5 = clip_tokenizer(), t5_tokenizer()
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=_SAMPLE_SIZE,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=_T5_DIM,
            caption_projection_dim=64,
            pooled_projection_dim=2 * _TEXT_DIM,
            pos_embed_max_size=96,
            dual_attention_layers=(0,) if v35 else (),
            qk_norm="rms_norm" if v35 else None,
        ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(
            seed + 1, 16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
        ),
        text_encoder=_clip(tokenizer, seed + 2, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, seed + 3, projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5(t5, seed + 4),
        tokenizer_3=t5,
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, t5 = clip_tokenizer(), t5_tokenizer()
    with _seeded(40):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_DIM,
            pooled_projection_dim=_TEXT_DIM,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(41, 16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip(tokenizer, 42),
        tokenizer=tokenizer,
        text_encoder_2=_t5(t5, 43),
        tokenizer_2=t5,
        transformer=transformer,
    )
    # FluxPipeline hard-codes default_sample_size = 128 (1024 px). This instance attribute is not
    # saved by save_pretrained: a reloaded copy needs height=64, width=64 to match.
    pipe.default_sample_size = _SAMPLE_SIZE
    return pipe


_BUILDERS = {
    "tiny-sd": _build_sd,
    "tiny-sdxl": _build_sdxl,
    "tiny-sd3": lambda: _build_sd3(v35=False),
    "tiny-sd35": lambda: _build_sd3(v35=True),
    "tiny-flux": _build_flux,
}


def build_tiny(name: str):
    """Build a fresh embedded tiny pipeline (CPU, fp32, fixed random weights) by name.

    ``name`` is one of :data:`TINY_MODELS` (case-insensitive). Each call builds new modules, so
    changing one pipeline never affects another. The caller's torch RNG state is left untouched.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _BUILDERS:
        raise ValueError(f"unknown tiny model {name!r}; available: {', '.join(TINY_MODELS)}")
    return _BUILDERS[key]()
