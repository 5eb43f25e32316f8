"""Tests for attnctrl.tokens: words/phrases of a prompt -> token indices per text encoder."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5Tokenizer

from attnctrl import tokens as tk
from attnctrl.tokens import TokenError, TokenRow

WORDS = "a an the and of on in with red white black car sheep dog cat horse field garden photo".split()


def _clip_in_memory() -> CLIPTokenizer:
    """A CLIP-style byte-level BPE (``</w>`` suffixes, BOS/EOS, lower-casing): WORDS are single
    tokens, "sunflowers" is "sun" + "flowers</w>", "skyscraper" is "sky" + "scraper</w>"."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    for c in alphabet:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    pieces = [[w + "</w>"] for w in WORDS] + [["sun", "flowers</w>"], ["sky", "scraper</w>"]]
    for word in pieces:
        for piece in word:
            syms = list(piece.removesuffix("</w>"))
            if piece.endswith("</w>"):
                syms[-1] += "</w>"
            cur = syms[0]
            for s in syms[1:]:
                if (cur, s) not in merges:
                    merges.append((cur, s))
                cur += s
                vocab.setdefault(cur, len(vocab))
    for s in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(s, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_in_memory() -> T5Tokenizer:
    """A T5-style unigram tokenizer (``▁`` pieces, EOS only, case-sensitive): WORDS are single
    pieces, "sunflowers" is "▁sun" + "flowers"."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in WORDS] + [("▁sun", -3.0), ("flowers", -3.0), ("▁Dog", -3.0)]
    vocab += [(c, -3.0) for c in ",.!?'()-"] + [(c, -9.0) for c in "abcdefghijklmnopqrstuvwxyzADHRSW"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


CLIP = _clip_in_memory()
T5 = _t5_in_memory()

ASSETS = Path(importlib.import_module("attnctrl.assets").__file__).resolve().parent / "tokenizers"
CLIP_ASSET = CLIPTokenizer.from_pretrained(str(ASSETS / "clip"), model_max_length=77)
T5_ASSET = T5Tokenizer.from_pretrained(str(ASSETS / "t5"))
REAL = "A red car, a white sheep and a dog in a field of sunflowers near a skyscraper, a Dog's house"


def decoded(tok, prompt: str, idx: list[int]) -> list[str]:
    """The tokens at ``idx`` of the sequence the pipeline feeds (padded to 77 for CLIP)."""
    ids = tok(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    return tok.convert_ids_to_tokens([ids[i] for i in idx])


def text_of(tok, prompt: str, idx: list[int]) -> str:
    ids = tok(prompt)["input_ids"]
    return tok.decode([ids[i] for i in idx]).strip()


# ----------------------------------------------------------------------------------------- words


def test_prompt_words_drop_punctuation_keep_case():
    assert tk.prompt_words("A Dog, and  a cat's toy!") == ["A", "Dog", "and", "a", "cat", "s", "toy"]
    assert tk.prompt_words("r2d2 -- x") == ["r2d2", "x"]


# ---------------------------------------------------------------------------------------- CLIP


def test_clip_single_word_has_bos_offset():
    p = "a red car and a white sheep"
    assert tk.resolve(CLIP, p, "car") == [3]  # BOS at 0, then a=1 red=2 car=3
    assert decoded(CLIP, p, [0]) == ["<|startoftext|>"]
    assert decoded(CLIP, p, tk.resolve(CLIP, p, "sheep")) == ["sheep</w>"]


def test_clip_phrase_is_all_tokens_of_consecutive_words():
    p = "a red car and a white sheep"
    idx = tk.resolve(CLIP, p, "white sheep")
    assert idx == [6, 7]
    assert decoded(CLIP, p, idx) == ["white</w>", "sheep</w>"]
    with pytest.raises(TokenError, match="'red sheep' is not a phrase"):
        tk.resolve(CLIP, p, "red sheep")


def test_clip_subword_split_returns_every_piece():
    p = "a field of sunflowers and a skyscraper"
    idx = tk.resolve(CLIP, p, "sunflowers")
    assert decoded(CLIP, p, idx) == ["sun", "flowers</w>"]
    assert idx == [4, 5]
    assert text_of(CLIP, p, tk.resolve(CLIP, p, "skyscraper")) == "skyscraper"


def test_clip_case_and_punctuation_are_ignored():
    p = "A Dog, a (CAT) and a dog!"
    assert decoded(CLIP, p, tk.resolve(CLIP, p, "dog")) == ["dog</w>"]
    assert tk.resolve(CLIP, p, "dog") == [2]  # the comma (3) is not part of the word
    assert decoded(CLIP, p, tk.resolve(CLIP, p, "cat")) == ["cat</w>"]
    assert tk.resolve(CLIP, p, "DOG#2") == tk.resolve(CLIP, p, "dog#2")
    assert tk.resolve(CLIP, p, "dog,") == [2]


def test_repeated_word_occurrences():
    p = "a dog and a cat and a dog"
    first, second = tk.resolve(CLIP, p, "dog#1"), tk.resolve(CLIP, p, "dog#2")
    assert first == [2] and second == [8]
    assert tk.resolve(CLIP, p, "dog") == first  # bare word = first occurrence
    assert decoded(CLIP, p, second) == ["dog</w>"]
    assert tk.resolve(CLIP, p, "a dog#2") == [7, 8]
    with pytest.raises(TokenError, match=r"occurrence 3 of 'dog'.*only 2 times"):
        tk.resolve(CLIP, p, "dog#3")
    with pytest.raises(TokenError, match="only once"):
        tk.resolve(CLIP, p, "cat#2")
    with pytest.raises(TokenError, match="count from 1"):
        tk.resolve(CLIP, p, "dog#0")


def test_unknown_word_lists_the_prompt_words():
    p = "a horse in a field"
    with pytest.raises(TokenError) as e:
        tk.resolve(CLIP, p, "hrose")
    msg = str(e.value)
    assert msg.startswith("'hrose' is not a word of the prompt 'a horse in a field'")
    assert "did you mean 'horse'" in msg
    assert msg.endswith("words: a, horse, in, field")
    assert isinstance(e.value, ValueError)


def test_empty_prompt_and_empty_spec():
    for p in ("", "   "):
        with pytest.raises(TokenError, match="prompt is empty"):
            tk.resolve(CLIP, p, "dog")
    with pytest.raises(TokenError, match="no words"):
        tk.resolve(CLIP, "!!! ...", "dog")
    with pytest.raises(TokenError, match="has no word"):
        tk.resolve(CLIP, "a dog", "  ,")


def test_raw_indices_validated_against_sequence_length():
    p = "a dog"
    assert tk.resolve(CLIP, p, 2) == [2]
    assert tk.resolve(CLIP, p, (0, 2, 76)) == [0, 2, 76]  # the padded sequence is 77 long
    assert tk.resolve(CLIP, p, torch.tensor([1, 2])) == [1, 2]
    with pytest.raises(TokenError, match=r"token index 77 is out of range .* 0\.\.76"):
        tk.resolve(CLIP, p, [1, 77])
    with pytest.raises(TokenError, match="out of range"):
        tk.resolve(CLIP, p, -1)
    with pytest.raises(TokenError, match="empty list"):
        tk.resolve(CLIP, p, [])
    with pytest.raises(TokenError, match="not an int"):
        tk.resolve(CLIP, p, [1.5])
    with pytest.raises(TokenError, match="bool"):
        tk.resolve(CLIP, p, True)
    # T5 has no real model_max_length: raw indices are checked against the given max length
    assert tk.resolve(T5, p, 255, max_length=256) == [255]
    with pytest.raises(TokenError, match="out of range"):
        tk.resolve(T5, p, 3)  # "▁a ▁dog </s>" without a max length: 3 tokens


def test_truncation_beyond_77():
    filler = " ".join(["red"] * 74)  # BOS + 74 + "dog" = index 75, the last kept token
    p = f"{filler} dog car"
    assert tk.resolve(CLIP, p, "dog") == [75]
    assert decoded(CLIP, p, [75, 76]) == ["dog</w>", "<|endoftext|>"]  # what the pipeline feeds
    with pytest.raises(TokenError, match=r"'car' is entirely truncated away.*77-token limit"):
        tk.resolve(CLIP, p, "car")
    with pytest.raises(TokenError, match="partly truncated"):
        tk.resolve(CLIP, f"{filler} sunflowers", "sunflowers")
    assert tk.resolve(CLIP, p, "car", max_length=100) == [76]


# ------------------------------------------------------------------------------------------ T5


def test_t5_has_no_bos():
    p = "a red car and a white sheep"
    assert tk.resolve(T5, p, "car") == [2]
    assert T5.convert_ids_to_tokens(T5(p)["input_ids"])[2] == "▁car"
    idx = tk.resolve(T5, p, "white sheep")
    assert idx == [5, 6] and text_of(T5, p, idx) == "white sheep"


def test_t5_subwords_case_and_lone_metaspace():
    p = "Dog, sunflowers and A"
    assert T5.convert_ids_to_tokens(T5(p)["input_ids"])[:2] == ["▁Dog", ","]
    assert tk.resolve(T5, p, "dog") == [0]
    assert text_of(T5, p, tk.resolve(T5, p, "sunflowers")) == "sunflowers"
    assert len(tk.resolve(T5, p, "sunflowers")) == 2
    # "A" is not a piece: "▁" + "A" (unknown char); both belong to the word
    toks = T5.convert_ids_to_tokens(T5(p)["input_ids"])
    assert [toks[i] for i in tk.resolve(T5, p, "a")] == ["▁", "A"]


def test_t5_truncation_uses_max_length():
    p = "a red car and a white sheep"
    assert tk.resolve(T5, p, "white", max_length=7) == [5]
    with pytest.raises(TokenError, match="truncated away"):
        tk.resolve(T5, p, "sheep", max_length=7)  # 6 kept + </s>


# ----------------------------------------------------------------------------- slow fallback


@pytest.mark.parametrize("tok", [CLIP, T5], ids=["clip", "t5"])
def test_alignment_fallback_matches_offsets(tok):
    p = "A Dog, a field of sunflowers (and) a dog!"
    fast = tk._encode(tok, p)
    slow = tk._encode_by_alignment(tok, p)
    words = tk._words(p)
    assert tk._word_tokens(slow, words) == tk._word_tokens(fast, words)
    assert slow.n_trailing_special == fast.n_trailing_special == 1


def test_slow_tokenizer_without_offsets_resolves():
    class Slow:  # a tokenizer that cannot give offsets
        is_fast = False

        def __init__(self, inner):
            self._t = inner
            self.model_max_length = inner.model_max_length

        def __call__(self, text, **kw):
            if kw.pop("return_offsets_mapping", False):
                raise NotImplementedError
            return self._t(text, **kw)

        def __getattr__(self, name):
            return getattr(self._t, name)

    p = "a field of sunflowers, a Dog and a dog"
    for inner in (CLIP, T5):
        slow = Slow(inner)
        for spec in ("sunflowers", "dog#2", "field of"):
            assert tk.resolve(slow, p, spec) == tk.resolve(inner, p, spec)
        assert tk.token_table(slow, p) == tk.token_table(inner, p)


# --------------------------------------------------------------------------------------- table


def test_token_table_rows():
    rows = tk.token_table(CLIP, "A dog, a dog")
    assert rows == [
        TokenRow(0, "<|startoftext|>", ""),
        TokenRow(1, "a</w>", "A"),
        TokenRow(2, "dog</w>", "dog"),
        TokenRow(3, ",</w>", ""),
        TokenRow(4, "a</w>", "a#2"),
        TokenRow(5, "dog</w>", "dog#2"),
        TokenRow(6, "<|endoftext|>", ""),
    ]
    # every labelled word resolves back to its rows
    p = "A dog, a dog"
    for r in rows:
        if r.word:
            assert r.index in tk.resolve(CLIP, p, r.word)
    t5rows = tk.token_table(T5, "sunflowers")
    assert [(r.index, r.token, r.word) for r in t5rows] == [
        (0, "▁sun", "sunflowers"),
        (1, "flowers", "sunflowers"),
        (2, "</s>", ""),
    ]


def test_token_table_truncation_rows():
    p = " ".join(["red"] * 75) + " dog car"
    rows = tk.token_table(CLIP, p)
    kept = [r for r in rows if not r.truncated]
    assert len(kept) == 77 and [r.index for r in kept] == list(range(77))
    assert kept[-1].token == "<|endoftext|>"
    assert [(r.token, r.word, r.index) for r in rows if r.truncated] == [("dog</w>", "dog", 76), ("car</w>", "car", 77)]


def test_format_table_side_by_side():
    p = "a dog, sunflowers"
    text = tk.format_table({"clip": tk.token_table(CLIP, p), "t5": tk.token_table(T5, p)})
    lines = text.splitlines()
    assert lines[0].split() == ["clip", "|", "t5"]
    assert lines[2].split() == ["#", "token", "word", "|", "#", "token", "word"]
    assert lines[3].split() == ["0", "<|startoftext|>", "|", "0", "▁a", "a"]
    assert lines[5].split() == ["2", "dog</w>", "dog", "|", "2", ","]
    assert lines[6].split() == ["3", ",</w>", "|", "3", "▁sun", "sunflowers"]
    assert lines[-1].split() == ["6", "<|endoftext|>", "|"]  # CLIP is longer; the T5 group is blank
    assert len({line.index("  |") for line in lines}) == 1  # the separator column lines up
    long = tk.format_table({"clip": tk.token_table(CLIP, " ".join(["red"] * 76))})
    assert long.splitlines()[-2].split() == ["-", "red</w>", "red#76"]
    assert "truncated away" in long.splitlines()[-1]
    assert tk.format_table({}) == ""


# ----------------------------------------------------------------------------------- pipelines


def _pipe(cls_name: str, **toks):
    cls = type(cls_name, (), {})
    obj = cls()
    for k, v in toks.items():
        setattr(obj, k, v)
    return obj


def test_encoder_tokenizers_in_order_skipping_none():
    sd3 = _pipe("StableDiffusion3Pipeline", tokenizer=CLIP, tokenizer_2=CLIP, tokenizer_3=None)
    assert list(tk.encoder_tokenizers(sd3)) == ["tokenizer", "tokenizer_2"]
    flux = _pipe("FluxPipeline", tokenizer=CLIP, tokenizer_2=T5)
    assert tk.encoder_tokenizers(flux) == {"tokenizer": CLIP, "tokenizer_2": T5}
    wrapped = SimpleNamespace(pipe=flux)
    assert tk.encoder_tokenizers(wrapped) == {"tokenizer": CLIP, "tokenizer_2": T5}


def test_resolve_all_and_joint_indices():
    p = "a red car and a white sheep"
    sd = _pipe("StableDiffusionPipeline", tokenizer=CLIP)
    sdxl = _pipe("StableDiffusionXLPipeline", tokenizer=CLIP, tokenizer_2=CLIP)
    sd3 = _pipe("StableDiffusion3Pipeline", tokenizer=CLIP, tokenizer_2=CLIP, tokenizer_3=T5, tokenizer_max_length=77)
    flux = _pipe("FluxPipeline", tokenizer=CLIP, tokenizer_2=T5)

    assert tk.resolve_all(sd3, p, "sheep") == {"tokenizer": [7], "tokenizer_2": [7], "tokenizer_3": [6]}
    assert tk.resolve_all(flux, p, "white sheep") == {"tokenizer": [6, 7], "tokenizer_2": [5, 6]}

    assert tk.joint_text_indices(sd, p, "car") == [3]
    assert tk.joint_text_indices(sdxl, p, "car", "sdxl") == [3]
    assert tk.joint_text_indices(sd3, p, "car") == [3, 77 + 2]
    assert tk.joint_text_indices(flux, p, "car") == [2]
    assert tk.joint_text_indices(flux, p, "car", family="flux") == [2]
    # SD3 with T5 dropped: CLIP indices only
    sd3_no_t5 = _pipe("StableDiffusion3Pipeline", tokenizer=CLIP, tokenizer_2=CLIP, tokenizer_3=None)
    assert tk.joint_text_indices(sd3_no_t5, p, "car") == [3]
    # raw indices index the joint sequence: 77 + 256 for SD3, 512 for FLUX
    assert tk.joint_text_indices(sd3, p, [0, 332]) == [0, 332]
    with pytest.raises(TokenError, match="out of range"):
        tk.joint_text_indices(sd3, p, 333)
    assert tk.joint_text_indices(flux, p, 511) == [511]
    with pytest.raises(TokenError, match="out of range"):
        tk.joint_text_indices(flux, p, 40, max_sequence_length=32)
    # T5 truncation follows max_sequence_length
    with pytest.raises(TokenError, match="truncated away"):
        tk.joint_text_indices(flux, p, "sheep", max_sequence_length=6)
    with pytest.raises(TokenError, match="unknown model family"):
        tk.joint_text_indices(flux, p, "car", "sd4")
    assert tk.encoder_max_lengths(sd3, max_sequence_length=128) == {
        "tokenizer": 77,
        "tokenizer_2": 77,
        "tokenizer_3": 128,
    }
    tables = tk.token_tables(flux, p)
    assert [r.token for r in tables["tokenizer_2"]][:3] == ["▁a", "▁red", "▁car"]


# ------------------------------------------------------------------------------ asset tokenizers


def test_clip_asset_tokenizer():
    tok, p = CLIP_ASSET, REAL
    assert tok.is_fast and decoded(tok, p, [0]) == ["<|startoftext|>"]
    for w, i in (("car", 3), ("sheep", 7), ("dog", 10)):
        assert tk.resolve(tok, p, w) == [i] and decoded(tok, p, [i]) == [w + "</w>"]
    sub = tk.resolve(tok, p, "sunflowers")
    assert len(sub) > 1 and sub == list(range(15, 15 + len(sub)))
    assert text_of(tok, p, sub) == "sunflowers"
    sky = tk.resolve(tok, p, "skyscraper")
    assert len(sky) > 1 and text_of(tok, p, sky) == "skyscraper"
    assert text_of(tok, p, tk.resolve(tok, p, "white sheep")) == "white sheep"
    second = tk.resolve(tok, p, "dog#2")
    assert second[0] > 10 and decoded(tok, p, second) == ["dog</w>"]  # "Dog's" -> dog
    with pytest.raises(TokenError, match="'sheep' is entirely truncated away"):
        tk.resolve(tok, " ".join(["dog"] * 80) + " sheep", "sheep")
    rows = tk.token_table(tok, p)
    assert rows[0] == TokenRow(0, "<|startoftext|>", "") and rows[-1].token == "<|endoftext|>"
    assert [r.word for r in rows if r.index in sub] == ["sunflowers"] * len(sub)


def test_t5_asset_tokenizer():
    tok, p = T5_ASSET, REAL
    toks = tok.convert_ids_to_tokens(tok(p)["input_ids"])
    assert toks[0] == "▁A" and toks[-1] == tok.eos_token  # no BOS: the first word is index 0
    assert tk.resolve(tok, p, "a", max_length=256) == [0]
    for w in ("car", "sheep", "dog"):
        idx = tk.resolve(tok, p, w, max_length=256)
        assert [toks[i] for i in idx] == ["▁" + w]
    sub = tk.resolve(tok, p, "sunflowers", max_length=256)
    assert len(sub) > 1 and toks[sub[0]].startswith("▁") and text_of(tok, p, sub) == "sunflowers"
    assert text_of(tok, p, tk.resolve(tok, p, "white sheep")) == "white sheep"
    assert [toks[i] for i in tk.resolve(tok, p, "dog#2")] == ["▁Dog"]
    with pytest.raises(TokenError, match="truncated away"):
        tk.resolve(tok, p, "house", max_length=20)


def test_asset_pipelines_joint_indices():
    p = REAL
    sd3 = _pipe("StableDiffusion3Pipeline", tokenizer=CLIP_ASSET, tokenizer_2=CLIP_ASSET, tokenizer_3=T5_ASSET)
    flux = _pipe("FluxPipeline", tokenizer=CLIP_ASSET, tokenizer_2=T5_ASSET)
    t5_sheep = tk.resolve(T5_ASSET, p, "sheep")
    assert tk.joint_text_indices(sd3, p, "sheep") == [7] + [77 + i for i in t5_sheep]
    assert tk.joint_text_indices(flux, p, "sheep") == t5_sheep
    assert tk.joint_text_indices(_pipe("Custom", tokenizer=CLIP_ASSET, tokenizer_2=T5_ASSET), p, "sheep") == t5_sheep
    text = tk.format_table(tk.token_tables(sd3, p))
    assert text.splitlines()[0].split() == ["tokenizer", "|", "tokenizer_2", "|", "tokenizer_3"]


def test_real_slow_sentencepiece_tokenizer_uses_alignment():
    from transformers.models.bert_generation.tokenization_bert_generation import BertGenerationTokenizer

    slow = BertGenerationTokenizer(str(ASSETS / "t5" / "spiece.model"))  # pure sentencepiece, no offsets
    assert not slow.is_fast
    p = REAL + " \u2603 (done)"
    assert slow(p)["input_ids"] == T5_ASSET(p, add_special_tokens=False)["input_ids"]
    for spec in ("sunflowers", "skyscraper", "dog#2", "white sheep", "s", "done"):
        assert tk.resolve(slow, p, spec) == tk.resolve(T5_ASSET, p, spec)


@pytest.mark.parametrize("tok", [CLIP_ASSET, T5_ASSET], ids=["clip", "t5"])
def test_asset_alignment_fallback_matches_offsets(tok):
    p = REAL + " \u2603 ice-cream caf\u00e9 (x2)"
    words = tk._words(p)
    assert tk._word_tokens(tk._encode_by_alignment(tok, p), words) == tk._word_tokens(tk._encode(tok, p), words)
