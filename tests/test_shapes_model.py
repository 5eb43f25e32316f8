"""The Shapes model: tokenizer, training reproducibility and resume, the shipped weights, loading."""

import json

import numpy as np
import pytest
import torch

import attnctrl as ac
from attnctrl.models.loading import DEFAULT_MODEL, family_of, load_pipeline
from attnctrl.shapes.data import VOCABULARY
from attnctrl.shapes.detect import detect, score
from attnctrl.shapes.model import (
    MAX_LENGTH,
    assets_dir,
    build_untrained,
    load_shapes_pipeline,
    save_shapes_pipeline,
    shapes_tokenizer,
    write_tokenizer,
)
from attnctrl.shapes.train import TrainConfig, train


@pytest.fixture(scope="module")
def shipped():
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tokenizer_is_word_level_and_shipped_files_are_current(tmp_path):
    tok = shapes_tokenizer()
    assert tok.model_max_length == MAX_LENGTH
    for word in VOCABULARY:
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a yellow circle, a purple triangle and a green square").input_ids
    assert len(ids) == 2 + 11 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(tok.tokenize("a zebra")) > 2  # unknown words still tokenize, as sub-words
    write_tokenizer(tmp_path)  # the shipped files are what write_tokenizer makes (up to formatting)
    shipped = assets_dir() / "tokenizer"
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads((shipped / "vocab.json").read_text())

    def merges(folder):
        return [line for line in (folder / "merges.txt").read_text().splitlines() if line and not line.startswith("#")]

    assert merges(tmp_path) == merges(shipped)


TINY = {
    "vae_steps": 2,
    "vae_batch": 2,
    "steps": 3,
    "batch": 2,
    "scale_batches": 1,
    "warmup": 1,
    "checkpoint_every": 100,
}


def _sig3(losses):
    return [(s, i, float(f"{v:.3g}")) for s, i, v in losses]


@pytest.mark.slow
def test_training_is_reproducible_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(**TINY)
    pipe_a, a = train(cfg, tmp_path / "a", progress=False, device="cpu")
    _, b = train(cfg, tmp_path / "b", progress=False, device="cpu")
    assert [(s, i) for s, i, _ in a] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert _sig3(a) == _sig3(b)
    _, other = train(TrainConfig(**{**TINY, "seed": 1}), tmp_path / "c", progress=False, device="cpu")
    assert _sig3(other) != _sig3(a)
    # interrupted after 3 steps (one into stage 2), then resumed: same curve, same weights
    none, first = train(cfg, tmp_path / "r", progress=False, device="cpu", stop_after=3)
    assert none is None and len(first) == 3
    pipe_r, r = train(cfg, tmp_path / "r", resume=True, progress=False, device="cpu")
    assert _sig3(r) == _sig3(a)
    for p, q in zip(pipe_a.unet.parameters(), pipe_r.unet.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert pipe_r.vae.config.scaling_factor == pipe_a.vae.config.scaling_factor > 0
    log = (tmp_path / "r" / "losses.csv").read_text().splitlines()
    assert log[0].startswith("stage,step,loss") and len(log) == 1 + 5
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["config"]["steps"] == 3 and summary["final_diffusion_loss"] > 0
    with pytest.raises(ValueError, match="another configuration"):
        train(TrainConfig(**{**TINY, "lr": 1.0}), tmp_path / "r", resume=True, progress=False, device="cpu")


def _latents(pipe, prompt="a red circle", steps=2):
    return pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        height=64,
        width=64,
    ).images


def test_save_and_reload_roundtrip(tmp_path):
    pipe = build_untrained(3)
    pipe.set_progress_bar_config(disable=True)
    save_shapes_pipeline(pipe, tmp_path / "fp32", fp16=False)
    back = load_shapes_pipeline(tmp_path / "fp32")
    back.set_progress_bar_config(disable=True)
    assert back.unet.dtype == torch.float32 and back.tokenizer.model_max_length == MAX_LENGTH
    assert torch.equal(_latents(pipe), _latents(back))
    with pytest.raises(FileNotFoundError, match="train"):
        load_shapes_pipeline(tmp_path / "missing")


def test_shipped_pipeline_roundtrips_through_fp16_storage(tmp_path, shipped):
    files = [p for p in assets_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert {p.parent.name for p in files if p.suffix == ".safetensors"} == {"vae", "text_encoder", "unet"}
    assert shipped.unet.dtype == torch.float32
    save_shapes_pipeline(shipped, tmp_path)  # fp16 storage of fp16-exact weights: lossless
    back = load_shapes_pipeline(tmp_path)
    back.set_progress_bar_config(disable=True)
    assert torch.equal(_latents(shipped), _latents(back))


@pytest.mark.slow
def test_shipped_model_draws_what_it_is_told(shipped):
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow square"]
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = shipped(prompts, generator=gens, num_inference_steps=25, guidance_scale=5.0, height=64, width=64)
    results = [score(p, detect(img)) for p, img in zip(prompts, out.images)]
    assert sum(r["presence"] for r in results) >= 3, results
    # and it is the prompt that decides: swapping prompts swaps what is found
    swapped = [score(prompts[(i + 1) % 4], detect(img))["presence"] for i, img in enumerate(out.images)]
    assert sum(swapped) <= 1


def test_shapes_is_the_embedded_default():
    assert DEFAULT_MODEL == "shapes"
    pipe = ac.load()
    assert family_of(pipe.pipe) == "sd" and pipe.defaults["height"] == 64
    assert pipe.defaults["num_inference_steps"] == 25 and pipe.defaults["guidance_scale"] == 5.0
    out = pipe("a purple circle", seed=0, num_inference_steps=10)
    image = out.images[0]
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 10  # a drawn picture, not a flat field
    assert (
        load_pipeline(" Shapes ").unet.config.cross_attention_dim
        == load_pipeline("shapes").text_encoder.config.hidden_size
    )
    with pytest.raises(TypeError, match="shapes"):
        load_pipeline("shapes", variant="fp16")
