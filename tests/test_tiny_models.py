"""Embedded tokenizers, tiny random-weight pipelines and the pipeline loader (all offline)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from attnctrl.models.loading import (
    DEFAULT_MODEL,
    ModelLoadError,
    UnsupportedModelError,
    family_of,
    load_pipeline,
)
from attnctrl.models.tiny import TINY_DEFAULTS, TINY_MODELS, build_tiny, tokenizer_dir

NAMES = list(TINY_MODELS)
FAMILY = {"tiny-sd": "sd", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "tiny-sd35": "sd3", "tiny-flux": "flux"}
COMMON_WORDS = (
    "a red car and a white sheep a photo of a dog sitting on a blue bench next to a green umbrella "
    "astronaut horse cat glasses clock yellow purple bear frog turtle crown balloon watercolor painting"
).split()


def _run(pipe, name: str, **kwargs) -> torch.Tensor:
    call = dict(num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    call.update(TINY_DEFAULTS[name])
    call.update(kwargs)
    return pipe("a red car and a white sheep", **call).images


def _state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{comp}.{key}": value
        for comp, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
        for key, value in module.state_dict().items()
    }


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def clip_tok():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir("clip"), model_max_length=77)


def test_clip_vocab_layout():
    vocab = json.loads((tokenizer_dir("clip") / "vocab.json").read_text(encoding="utf-8"))
    assert 1000 <= len(vocab) <= 3000
    ids = sorted(vocab.values())
    assert ids == list(range(len(vocab)))
    by_id = {i: t for t, i in vocab.items()}
    assert all(len(by_id[i]) == 1 for i in range(256))  # the 256 byte symbols
    assert all(by_id[i + 256] == by_id[i] + "</w>" for i in range(256))
    assert by_id[len(vocab) - 2] == "<|startoftext|>" and by_id[len(vocab) - 1] == "<|endoftext|>"


def test_clip_tokenizer_words(clip_tok):
    from transformers import CLIPTokenizerFast

    fast = CLIPTokenizerFast.from_pretrained(tokenizer_dir("clip"))
    assert clip_tok.model_max_length == 77 and len(clip_tok) == len(fast) > 1000
    for word in COMMON_WORDS:
        assert clip_tok.tokenize(word) == [word + "</w>"], word
    ids = clip_tok("A photo of a dog").input_ids
    assert ids[0] == clip_tok.bos_token_id and ids[-1] == clip_tok.eos_token_id and len(ids) == 7
    assert fast("A photo of a dog").input_ids == ids
    for rare in ("sunflowers", "skyscraper"):
        pieces = clip_tok.tokenize(rare)
        assert len(pieces) >= 2 and pieces[-1].endswith("</w>") and "".join(pieces) == rare + "</w>"
    enc = clip_tok("a cat, sunflowers", return_offsets_mapping=True)
    assert [tuple(o) for o in enc.offset_mapping[1:-1]] == [(0, 1), (2, 5), (5, 6), (7, 10), (10, 17)]
    padded = clip_tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == clip_tok.pad_token_id == clip_tok.eos_token_id


def test_t5_tokenizer():
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tokenizer_dir("t5"))
    assert tok.pad_token_id == 0 and tok.eos_token == "</s>" and 500 <= len(tok) <= 3000
    enc = tok("A red car, sunflowers", return_offsets_mapping=True)
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    assert pieces[:4] == ["▁A", "▁red", "▁car", ","] and pieces[-1] == "</s>"
    assert len(pieces) > 6 and tok.unk_token_id not in enc.input_ids  # "sunflowers" splits
    assert [tuple(o) for o in enc.offset_mapping[:3]] == [(0, 1), (2, 5), (6, 9)]
    padded = tok("a cat", padding="max_length", max_length=8).input_ids
    assert padded == padded[:3] + [0] * 5 and padded[2] == tok.eos_token_id


def test_clip_assets_regenerate_identically(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "build_tokenizer_assets", Path(__file__).resolve().parents[1] / "scripts" / "build_tokenizer_assets.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.write_clip(script.read_words(), tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir("clip") / name).read_bytes(), name


# --------------------------------------------------------------------------- tiny pipelines


@pytest.mark.parametrize("name", NAMES)
def test_tiny_builds_deterministically(name):
    rng = torch.random.get_rng_state()
    first, second = build_tiny(name), build_tiny(name.upper())
    assert torch.equal(rng, torch.random.get_rng_state())  # the caller's RNG is left alone
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values() if v.is_floating_point()} == {torch.float32}
    denoiser = "unet" if hasattr(first, "unet") else "transformer"
    assert getattr(first, denoiser) is not getattr(second, denoiser)  # fresh modules every call


@pytest.mark.parametrize("name", NAMES)
def test_tiny_runs_end_to_end(name):
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    latents = _run(pipe, name)
    expected = {"tiny-sd": (1, 4, 32, 32), "tiny-sdxl": (1, 4, 32, 32), "tiny-flux": (1, 256, 64)}
    assert tuple(latents.shape) == expected.get(name, (1, 16, 32, 32))  # FLUX returns packed latents
    assert torch.isfinite(latents).all()
    image = _run(pipe, name, output_type="pil")[0]
    assert image.size == (64, 64)


def test_tiny_attention_layout():
    sd = build_tiny("tiny-sd").unet.attn_processors
    assert len(sd) == 14 and sum(k.endswith("attn2.processor") for k in sd) == 7
    sd35 = build_tiny("tiny-sd35").transformer.attn_processors
    assert "transformer_blocks.0.attn2.processor" in sd35 and "transformer_blocks.1.attn2.processor" not in sd35
    flux = build_tiny("tiny-flux")
    assert "single_transformer_blocks.1.attn.processor" in flux.transformer.attn_processors
    assert flux.default_sample_size * flux.vae_scale_factor == 64


def test_unknown_tiny_name():
    with pytest.raises(ValueError, match="tiny-sd"):
        build_tiny("tiny-nope")


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_reproduces_latents(name, tmp_path):
    pipe = build_tiny(name)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe) and family_of(loaded) == FAMILY[name]
    # What is saved comes back bit for bit: every weight of every component.
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            saved, back = module.state_dict(), getattr(loaded, component).state_dict()
            assert saved.keys() == back.keys(), component
            assert all(torch.equal(saved[k], back[k]) for k in saved), component
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    # The same weights then give the same latents up to float32 rounding, not bit for bit: the loaded
    # tensors live at other addresses (memory-mapped from safetensors), and AVX2 GEMM kernels choose
    # their blocking, hence their summation order, by alignment (text_encoder_2's pooled output moves
    # by 2e-7 here). A few ulps of a float32 sum (~1e-7 relative), carried through two UNet steps,
    # stay far below 1e-4; a wrong weight, config or scheduler moves latents by O(1).
    # FluxPipeline's default_sample_size is not saved: give the size explicitly.
    size = dict(height=64, width=64)
    torch.testing.assert_close(_run(loaded, name, **size), _run(pipe, name, **size), rtol=1e-4, atol=1e-4)


def test_load_pipeline_kinds(tmp_path):
    default = load_pipeline()
    assert DEFAULT_MODEL == "shapes" and family_of(default) == "sd"
    assert load_pipeline(default) is default
    assert load_pipeline(" Tiny-SDXL ").unet.config.addition_embed_type == "text_time"
    assert load_pipeline("tiny-sd3", torch_dtype=torch.float16).transformer.dtype == torch.float16
    with pytest.raises(TypeError, match="variant"):
        load_pipeline("tiny-sd", variant="fp16")


@pytest.mark.parametrize("model", ["not-a-model", "tiny sd", "./missing/folder"])
def test_unknown_model_lists_embedded_names(model):
    with pytest.raises(ModelLoadError) as info:
        load_pipeline(model)
    assert isinstance(info.value, ValueError)
    assert all(name in str(info.value) for name in NAMES)


def test_unreachable_hub_id_and_bad_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="could not load the hub id 'attnctrl-test/no-such-model'") as info:
        load_pipeline("attnctrl-test/no-such-model")
    assert "tiny-sd" in str(info.value) and info.value.__cause__ is not None
    with pytest.raises(ModelLoadError, match="local folder"):
        load_pipeline(tmp_path)  # exists, but holds no model_index.json
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="from_single_file"):
        load_pipeline(tmp_path / "model.safetensors")


def test_family_of_variants_and_unsupported():
    import diffusers

    sd, sdxl, sd3 = build_tiny("tiny-sd"), build_tiny("tiny-sdxl"), build_tiny("tiny-sd3")
    assert family_of(diffusers.StableDiffusionPAGPipeline.from_pipe(sd)) == "sd"
    assert family_of(diffusers.StableDiffusionXLPAGPipeline.from_pipe(sdxl)) == "sdxl"
    assert family_of(diffusers.StableDiffusion3PAGPipeline.from_pipe(sd3)) == "sd3"
    assert family_of(diffusers.StableDiffusionImg2ImgPipeline.from_pipe(sd)) == "sd"
    unet = diffusers.UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(UnsupportedModelError, match="DDPMPipeline"):
        family_of(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()))
    with pytest.raises(UnsupportedModelError):
        family_of(object())
