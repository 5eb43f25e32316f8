#!/usr/bin/env python
"""Regenerate the embedded offline tokenizers in ``assets/tokenizers/``.

Both tokenizers are trained on ``assets/tokenizers/words.txt`` (a few hundred common prompt words),
so the tiny random-weight pipelines (``attnctrl.models.tiny``) can tokenize ordinary English prompts
without downloading anything.

* ``clip/``: byte-level BPE in the exact layout of OpenAI CLIP's tokenizer (``vocab.json``,
  ``merges.txt``): ids 0-255 are the 256 byte symbols, 256-511 their ``</w>`` (end-of-word) forms,
  then one id per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
  Every listed word becomes a single ``word</w>`` token; unlisted words split into sub-words.
  The merges are learned by a small pure-Python BPE trainer with a fixed tie-break (highest pair
  count, then lexicographically smallest pair): the ``tokenizers`` library's BPE trainer breaks ties
  differently from one process to the next, so it cannot regenerate identical files.
* ``t5/``: a SentencePiece unigram model (``spiece.model``, trained single-threaded, which is
  deterministic) plus the ``tokenizer.json`` that ``transformers.T5Tokenizer`` derives from it.
  Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2; no ``<extra_id_*>`` sentinels.

Usage::

    python scripts/build_tokenizer_assets.py            # rewrite assets/tokenizers/{clip,t5}
    python scripts/build_tokenizer_assets.py --check    # verify the committed files are up to date
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import string
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "tokenizers"
WORDS_FILE = ASSETS / "words.txt"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


def read_words(path: Path = WORDS_FILE) -> list[str]:
    """Words of ``words.txt`` in file order, lower-cased, without comments or duplicates."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word = line.strip().lower()
        if word and not word.startswith("#") and word not in words:
            words.append(word)
    return words


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_clip_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol; deterministic tie-break."""
    byte_map = bytes_to_unicode()
    seqs = []
    for word in words:
        chars = [byte_map[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        seqs.append(chars)
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seq in seqs:
            counts.update(zip(seq, seq[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for k, seq in enumerate(seqs):
            if len(seq) < 2:
                continue
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == best[0] and seq[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def write_clip(words: list[str], out: Path) -> None:
    """Write a CLIP tokenizer directory (vocab.json, merges.txt, configs)."""
    out.mkdir(parents=True, exist_ok=True)
    merges = train_clip_bpe(words)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    assert len(set(vocab_list)) == len(vocab_list), "duplicate CLIP vocab entries"
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def t5_training_lines(words: list[str]) -> list[str]:
    """Distinct multi-word lines (every word in several of them, lower-case and capitalised) plus all
    printable ASCII characters, so SentencePiece keeps whole words as pieces and no ASCII is ``<unk>``."""
    n = len(words)
    lines = [" ".join(words[(i + j * step) % n] for j in range(6)) for step in (1, 37, 101, 211) for i in range(n)]
    lines += [" ".join(words[(i + j * step) % n].capitalize() for j in range(6)) for step in (1, 53) for i in range(n)]
    lines.append(" ".join(string.digits + string.ascii_letters + string.punctuation))
    return lines


def write_t5(words: list[str], out: Path) -> None:
    """Write a T5 tokenizer directory (spiece.model, tokenizer.json, configs)."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t5_training_lines(words)),
        model_writer=model,
        model_type="unigram",
        vocab_size=2000,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "spiece.model").write_bytes(model.getvalue())
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=0, model_max_length=T5_MAX_LENGTH)
        tok.save_pretrained(tmp)
        (out / "spiece.model").write_bytes(model.getvalue())
        tok_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
    _write_json(out / "tokenizer.json", tok_json)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": T5_MAX_LENGTH,
        "extra_ids": 0,
        **special,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def build(out: Path) -> None:
    words = read_words()
    write_clip(words, out / "clip")
    write_t5(words, out / "t5")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="output folder (default: assets/tokenizers)")
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        build(args.out)
        print(f"wrote {args.out / 'clip'} and {args.out / 't5'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        stale = [
            f"{sub}/{f.name}"
            for sub in ("clip", "t5")
            for f in sorted((Path(tmp) / sub).iterdir())
            if not (args.out / sub / f.name).is_file() or not filecmp.cmp(f, args.out / sub / f.name, shallow=False)
        ]
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    print("tokenizer assets are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
