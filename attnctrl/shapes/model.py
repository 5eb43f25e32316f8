"""The Shapes text-to-image model: a small Stable-Diffusion-style pipeline for the Shapes world.

``AutoencoderKL`` (64×64×3 ↔ 16×16×4, three blocks), a 3-layer ``CLIPTextModel`` (hidden 96) on a
word-level CLIP tokenizer (every caption word is one token), a ``UNet2DConditionModel`` with
cross-attention at 16×16 and 8×8 latents, and a DDIM scheduler. Trained weights ship in
``attnctrl.assets/shapes`` (fp16 safetensors, loaded as fp32); see ``attnctrl.shapes.train``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

import torch

from ..models.loading import SHAPES_DEFAULTS  # the embedded-model table is its one home
from .data import VOCABULARY

__all__ = [
    "MAX_LENGTH",
    "SHAPES_DEFAULTS",
    "assets_dir",
    "build_untrained",
    "has_trained_weights",
    "load_shapes_pipeline",
    "save_shapes_pipeline",
    "shapes_tokenizer",
    "write_tokenizer",
]

MAX_LENGTH = 24  # token positions: the longest caption of the world plus <bos>/<eos> fits
_TEXT_DIM = 96
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def assets_dir() -> Path:
    """Folder of the shipped Shapes pipeline (``attnctrl.assets/shapes``)."""
    return Path(str(files("attnctrl.assets") / "shapes"))


def _byte_symbols() -> list[str]:
    """CLIP/GPT-2's printable stand-ins for the 256 byte values, in byte order of the vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str | Path, words=VOCABULARY) -> Path:
    """Write a word-level CLIP tokenizer (``vocab.json``, ``merges.txt``, configs) into ``folder``.

    Byte symbols and their ``</w>`` forms come first (so any text still tokenizes), then greedy BPE
    merges learned on ``words`` until each listed word is a single ``word</w>`` token.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    seqs = []
    for word in words:
        chars = list(word)
        chars[-1] += "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while any(len(seq) > 1 for seq in seqs):  # greedy BPE: most frequent pair, ties by smallest pair
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in itertools.pairwise(seq):
                counts[pair] = counts.get(pair, 0) + 1
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out
    vocab[_BOS], vocab[_EOS] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _EOS,
        "unk_token": _EOS,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    specials = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": _EOS, "unk_token": _EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return folder


def shapes_tokenizer(folder: str | Path | None = None):
    """The word-level tokenizer from ``folder`` (default: the shipped one, else freshly written)."""
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder is not None else assets_dir() / "tokenizer"
    if not (folder / "vocab.json").exists():
        folder = write_tokenizer(Path(tempfile.mkdtemp(prefix="shapes-tok-")))
    return _closed(CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH))


def _closed(tokenizer):
    """Mark the tokenizer's vocabulary as closed: `attnctrl.run_args` warns about other prompt words
    (the tokenizer still encodes them, as byte pieces the model never saw in training)."""
    tokenizer.closed_vocabulary = frozenset(VOCABULARY)
    return tokenizer


def _scheduler():
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
        timestep_spacing="trailing",
    )


def build_untrained(seed: int = 0, tokenizer_folder: str | Path | None = None):
    """A randomly initialised Shapes ``StableDiffusionPipeline`` (fp32, CPU), the same for the same seed."""
    # diffusers.models: mypy reads diffusers' top-level model names as its dummy classes
    from diffusers import StableDiffusionPipeline
    from diffusers.models import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = shapes_tokenizer(tokenizer_folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=64,
            scaling_factor=1.0,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=_TEXT_DIM,
                intermediate_size=4 * _TEXT_DIM,
                projection_dim=_TEXT_DIM,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=MAX_LENGTH,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(48, 96),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),  # diffusers' legacy name: the number of heads (head dim 24)
            norm_num_groups=16,
            cross_attention_dim=_TEXT_DIM,
        )
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def has_trained_weights(path: str | Path | None = None) -> bool:
    """Whether ``path`` (default: the shipped folder) holds a saved Shapes pipeline."""
    path = Path(path) if path is not None else assets_dir()
    return (path / "model_index.json").exists() and (path / "unet").is_dir()


def save_shapes_pipeline(pipe, path: str | Path, fp16: bool = True) -> Path:
    """Save ``pipe`` as diffusers safetensors (fp16 storage by default), leaving ``pipe`` in fp32."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix="shapes-save-"))
    try:
        if fp16:
            pipe.to(torch.float16)
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        pipe.to(torch.float32)
    for name in ("vae", "text_encoder", "unet", "tokenizer", "scheduler", "model_index.json"):
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        shutil.move(str(item), path / item.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(path / "tokenizer")  # ship the word-level vocab/merges files, not a tokenizer.json
    write_tokenizer(path / "tokenizer")
    return path


def load_shapes_pipeline(path: str | Path | None = None):
    """The trained Shapes pipeline from ``path`` (default: the shipped weights), fp32 on CPU."""
    from diffusers import StableDiffusionPipeline

    path = Path(path) if path is not None else assets_dir()
    if not has_trained_weights(path):
        raise FileNotFoundError(
            f"no trained Shapes pipeline in {str(path)!r}; train one with `python -m attnctrl.shapes.train`"
        )
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    bars = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _ in bars:  # loading takes a fraction of a second: no progress bars
        m.disable_progress_bar()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            path, dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    finally:
        for m, was in bars:
            if was:
                m.enable_progress_bar()
    pipe.tokenizer.model_max_length = MAX_LENGTH
    _closed(pipe.tokenizer)
    return pipe
