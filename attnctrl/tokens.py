"""Resolve words and phrases of a prompt to token indices, for every text encoder of a model.

Controls name tokens the way a user reads the prompt (``"sheep"``, ``"white sheep"``, ``"dog#2"``);
this module turns them into indices into the *full* input sequence each encoder is fed by the
diffusers pipeline: CLIP sequences start with BOS at index 0 and are truncated at 77, T5 sequences
have no BOS and are truncated at the pipeline's ``max_sequence_length``.

Words are runs of letters and digits (``[^\\W_]+``); matching is case-insensitive and ignores
punctuation, so ``"Dog,"`` in a prompt is the word ``dog``, and ``"dog's"`` is the two words
``dog``, ``s``. Tokens are mapped to words through the fast tokenizers' character offsets, which
works alike for CLIP (lower-cased BPE, ``</w>`` suffixes) and T5 (``▁`` sentencepiece pieces). A
word split into several sub-word pieces yields all of them; a lone ``▁`` piece that T5 emits in
front of a word belongs to that word.

A word that occurs more than once: the bare word means its **first** occurrence (``"dog"`` is
``"dog#1"``), ``"dog#2"`` the second. This keeps the common case short and matches what
``attnctrl tokens`` prints in its word column (``dog``, ``dog#2``).
"""

from __future__ import annotations

import bisect
import difflib
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

__all__ = [
    "TokenSpec",
    "TokenError",
    "TruncatedError",
    "GroupsLike",
    "parse_groups",
    "TokenRow",
    "prompt_words",
    "word_labels",
    "resolve",
    "token_table",
    "format_table",
    "encoder_tokenizers",
    "encoder_max_lengths",
    "resolve_all",
    "token_tables",
    "joint_text_indices",
]

TokenSpec = Union[str, int, Sequence[int]]

_WORD = re.compile(r"[^\W_]+")
_OCCURRENCE = re.compile(r"^(.*?)\s*#\s*(\d+)\s*$", re.S)
_HUGE = 1_000_000  # tokenizers without a real limit report model_max_length ~1e30
_FAMILIES = ("sd", "sdxl", "sd3", "flux")
_T5_DEFAULT = {"sd3": 256, "flux": 512}  # diffusers' default max_sequence_length


class TokenError(ValueError):
    """A token spec that does not resolve against a prompt (unknown word, bad index, ...)."""


class TruncatedError(TokenError):
    """A word whose tokens (some or all) lie beyond the text encoder's length: the model never saw it."""


GroupsLike = Union[str, Sequence[Union[str, int, Sequence[Union[str, int]]]]]


def parse_groups(groups: GroupsLike | None) -> list[list]:
    """Token groups (Conform, AttentionModulation) as lists of token specs; the syntax only.

    Accepts ``"red car;white sheep"`` (groups separated by ``;``, words by spaces), a list of such
    strings (``["red car", "white sheep"]``; the command line's ``groups=red car,white sheep``) or a
    list of lists of words, phrases or raw token indices (``[["red", "car"], ["light blue",
    "sheep"]]``); a bare index is a group of its own. ``None`` or a blank string → no groups. Words
    are stripped. Raises ValueError for an empty group, a blank word, or a ``;`` inside a list item.
    Each control checks what its groups may hold (overlaps, words only) itself.
    """
    if groups is None:
        return []
    if isinstance(groups, str):
        if not groups.strip():
            return []
        items: list = groups.split(";")
    else:
        items = list(groups)
    out: list[list] = []
    for item in items:
        if isinstance(item, str):
            if ";" in item:
                raise ValueError(
                    f"groups: {item!r} contains ';' — separate groups with ';' only in the one-string form"
                )
            words: list = item.split()
        elif isinstance(item, (list, tuple)):
            words = list(item)
        else:
            words = [item]
        if not words:
            raise ValueError(f"groups: empty group in {groups!r}; give at least one word per group")
        for w in words:
            if isinstance(w, str) and not w.strip():
                raise ValueError(f"groups: each word must be a non-empty string, got {w!r} in {item!r}")
        out.append([w.strip() if isinstance(w, str) else w for w in words])
    return out


class TokenRow(NamedTuple):
    """One token of an encoder's input: its index, token string, the prompt word it belongs to
    (``"dog#2"`` for a repeated word; ``""`` for specials and punctuation) and whether the encoder's
    max length truncates it away."""

    index: int  # type: ignore[assignment]  # the field shadows tuple.index (public name, kept)
    token: str
    word: str
    truncated: bool = False


@dataclass(frozen=True)
class _Word:
    text: str
    start: int
    end: int

    @property
    def key(self) -> str:
        return self.text.casefold()


@dataclass
class _Encoding:
    tokens: list[str]
    spans: list[tuple[int, int] | None]  # character span in the prompt; None for special tokens
    n_trailing_special: int


# ---------------------------------------------------------------------------------------- words


def _words(prompt: str) -> list[_Word]:
    return [_Word(m.group(), m.start(), m.end()) for m in _WORD.finditer(prompt)]


def prompt_words(prompt: str) -> list[str]:
    """The words of ``prompt`` in order, as written (punctuation dropped)."""
    return [w.text for w in _words(prompt)]


def word_labels(prompt: str) -> list[str]:
    """One label per word of ``prompt``, in order, that resolves to that word: as written, and
    ``word#n`` for its n-th occurrence, counted case-insensitively as `resolve` counts
    ("A Cat and a cat" → A, Cat, and, a#2, cat#2). The maps, the CLI and the app all label with it."""
    return _labels(_words(prompt))


def _check_prompt(prompt: Any) -> list[_Word]:
    if not isinstance(prompt, str):
        raise TokenError(f"the prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise TokenError("the prompt is empty: there are no words to resolve tokens against")
    words = _words(prompt)
    if not words:
        raise TokenError(f"the prompt {prompt!r} has no words (only punctuation)")
    return words


def _short(prompt: str, limit: int = 60) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


# ------------------------------------------------------------------------------------ encoding


def _max_length(tokenizer: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        return int(max_length)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < _HUGE else None


def _encode(tokenizer: Any, prompt: str) -> _Encoding:
    """Tokenize ``prompt`` with special tokens and no truncation, locating every token in it."""
    if getattr(tokenizer, "is_fast", False):
        try:
            enc = tokenizer(
                prompt,
                add_special_tokens=True,
                truncation=False,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                verbose=False,
            )
        except NotImplementedError:
            enc = None
        if enc is not None:
            ids = list(enc["input_ids"])
            special = [bool(s) for s in enc["special_tokens_mask"]]
            spans = [None if s else (int(a), int(b)) for s, (a, b) in zip(special, enc["offset_mapping"])]
            return _Encoding(tokenizer.convert_ids_to_tokens(ids), spans, _trailing(special))
    return _encode_by_alignment(tokenizer, prompt)


def _trailing(special: list[bool]) -> int:
    n = 0
    for s in reversed(special):
        if not s:
            break
        n += 1
    return n


def _encode_by_alignment(tokenizer: Any, prompt: str) -> _Encoding:
    """Slow-tokenizer fallback (no offsets): rebuild each token's character span by walking the
    token strings along the prompt, both case-folded and without whitespace. Tokens that do not
    spell out their text (unknown tokens, partial bytes) take the gap up to the next token that
    does; a piece that is only whitespace (T5's lone ``▁``) takes the first character of the next
    token, as fast tokenizers report it."""
    ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk in {getattr(tokenizer, f"{n}_token_id", None) for n in ("bos", "eos", "pad")}:
        unk = None  # CLIP: unk is EOS, and byte-level BPE has no unknown tokens
    mask = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
    special = [bool(m) and i != unk for m, i in zip(mask, ids)]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    chars = [(c, i) for i, ch in enumerate(prompt) if not ch.isspace() for c in ch.casefold()]
    compact = "".join(c for c, _ in chars)
    pos = [i for _, i in chars] + [len(prompt)]

    def text(k: int) -> str | None:  # None: a token that does not spell its text
        if ids[k] == unk:
            return None
        s = tokenizer.convert_tokens_to_string([tokens[k]]).replace("</w>", "")
        return "".join(s.split()).casefold()

    spans: list[tuple[int, int] | None] = [None] * len(ids)
    glue: list[int] = []  # whitespace-only pieces
    cursor = 0
    pending: list[int] = []  # tokens waiting for the next anchored token to bound them
    for k in range(len(ids)):
        if special[k]:
            continue
        t = text(k)
        if t == "":
            glue.append(k)
            continue
        at = -1
        if t is not None:
            at = cursor if compact.startswith(t, cursor) else (compact.find(t, cursor) if pending else -1)
        if t is None or at < 0:  # (t is None implies at < 0; spelled out for the type checker)
            pending.append(k)
            continue
        for p in pending:
            spans[p] = (pos[cursor], pos[at] if at > cursor else pos[cursor] + 1)
        pending = []
        spans[k] = (pos[at], pos[at + len(t) - 1] + 1)
        cursor = at + len(t)
    for p in pending:
        spans[p] = (pos[cursor], len(prompt))
    for g in reversed(glue):
        nxt = next((spans[j] for j in range(g + 1, len(ids)) if spans[j] is not None), None)
        start = nxt[0] if nxt else len(prompt)
        spans[g] = (start, start + 1)
    return _Encoding(tokens, spans, _trailing(special))


def _word_tokens(enc: _Encoding, words: list[_Word]) -> list[list[int]]:
    """For each word, the indices of the tokens whose span overlaps it."""
    out: list[list[int]] = [[] for _ in words]
    starts = [w.start for w in words]
    for k, span in enumerate(enc.spans):
        if span is None:
            continue
        a, b = span
        if b <= a:
            b = a + 1
        # words are sorted and disjoint: scan from the first word that could overlap
        j = max(bisect.bisect_right(starts, a) - 1, 0)
        while j < len(words) and words[j].start < b:
            if words[j].end > a:
                out[j].append(k)
            j += 1
    return out


# ------------------------------------------------------------------------------------- resolve


def _raw_indices(spec: Any, length: int, prompt: str) -> list[int]:
    if hasattr(spec, "tolist"):  # tensors / arrays
        spec = spec.tolist()
    items = [spec] if not isinstance(spec, Sequence) else list(spec)
    if not items:
        raise TokenError("an empty list of token indices selects nothing")
    out = []
    for x in items:
        if isinstance(x, bool):
            raise TokenError(f"token index {x!r} is a bool, not an int")
        try:
            i = operator.index(x)
        except TypeError:
            raise TokenError(f"token index {x!r} is not an int") from None
        if not 0 <= i < length:
            raise TokenError(
                f"token index {i} is out of range for the prompt {_short(prompt)!r}: valid indices are 0..{length - 1}"
            )
        out.append(i)
    return out


def _parse_spec(spec: str) -> tuple[list[str], int, str]:
    m = _OCCURRENCE.match(spec)
    text, occurrence = (m.group(1), int(m.group(2))) if m else (spec, 1)
    keys = [w.casefold() for w in _WORD.findall(text)]
    if not keys:
        raise TokenError(f"token spec {spec!r} has no word in it")
    if occurrence < 1:
        raise TokenError(f"token spec {spec!r}: occurrences count from 1 ('{text.strip()}#1' is the first)")
    return keys, occurrence, text.strip()


def _find(words: list[_Word], keys: list[str]) -> list[int]:
    n = len(keys)
    return [i for i in range(len(words) - n + 1) if [w.key for w in words[i : i + n]] == keys]


def resolve(tokenizer: Any, prompt: str, spec: TokenSpec, *, max_length: int | None = None) -> list[int]:
    """Token indices of ``spec`` in the sequence ``tokenizer`` makes of ``prompt``.

    ``spec`` is a word (``"sheep"``), a phrase of consecutive words (``"white sheep"``), either
    with ``#n`` for its n-th occurrence (``"dog#2"``; the bare form is the first occurrence), or
    raw indices (an int or a sequence of ints, checked against the sequence length and returned
    as given). Indices count special tokens: CLIP's BOS is index 0, T5 has none.

    ``max_length`` is the length the encoder truncates to (default: ``tokenizer.model_max_length``
    when it is a real limit, e.g. 77 for CLIP; pass the pipeline's ``max_sequence_length`` for T5).
    Raises :class:`TokenError` for an empty prompt, an unknown word, a missing occurrence, a word
    truncated away, or an index out of range. Returns sorted indices for words.
    """
    words = _check_prompt(prompt)
    limit = _max_length(tokenizer, max_length)
    if not isinstance(spec, str):
        if limit is None:
            limit = len(_encode(tokenizer, prompt).tokens)
        return _raw_indices(spec, limit, prompt)

    keys, occurrence, text = _parse_spec(spec)
    hits = _find(words, keys)
    if not hits:
        kind = "word" if len(keys) == 1 else "phrase"
        uniq = list(dict.fromkeys(w.key for w in words))
        close = difflib.get_close_matches(" ".join(keys), uniq, n=1) if len(keys) == 1 else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TokenError(f"{text!r} is not a {kind} of the prompt {_short(prompt)!r}{hint}; words: {', '.join(uniq)}")
    if occurrence > len(hits):
        times = "once" if len(hits) == 1 else f"{len(hits)} times"
        raise TokenError(
            f"{spec.strip()!r} asks for occurrence {occurrence} of {text!r}, "
            f"but it occurs only {times} in the prompt {_short(prompt)!r}"
        )
    first = hits[occurrence - 1]
    enc = _encode(tokenizer, prompt)
    per_word = _word_tokens(enc, words)
    idx = sorted({k for w in range(first, first + len(keys)) for k in per_word[w]})
    if not idx:
        raise TokenError(f"{spec.strip()!r} maps to no token of the prompt {_short(prompt)!r}")
    if limit is not None:
        keep = limit - enc.n_trailing_special
        cut = [k for k in idx if k >= keep]
        if cut:
            part = "entirely" if len(cut) == len(idx) else "partly"
            raise TruncatedError(
                f"{spec.strip()!r} is {part} truncated away: its tokens {idx} lie beyond the encoder's "
                f"{limit}-token limit (the last prompt token kept is index {keep - 1}); shorten the prompt"
            )
    return idx


# --------------------------------------------------------------------------------------- table


def _labels(words: list[_Word]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for w in words:
        seen[w.key] = seen.get(w.key, 0) + 1
        n = seen[w.key]
        out.append(w.text if n == 1 else f"{w.text}#{n}")
    return out


def token_table(tokenizer: Any, prompt: str, *, max_length: int | None = None) -> list[TokenRow]:
    """One :class:`TokenRow` per token the encoder is fed for ``prompt`` (specials included,
    padding left out), in sequence order. When ``max_length`` truncates the prompt, the trailing
    specials (CLIP's EOS) come at the index the encoder sees them, and the tokens cut away follow
    at the end with ``truncated=True`` (their index is where they would have been). The word of a
    repeated word carries its occurrence (``dog#2``), i.e. the spec that selects it."""
    words = _check_prompt(prompt)
    enc = _encode(tokenizer, prompt)
    limit = _max_length(tokenizer, max_length)
    labels = _labels(words)
    owner: dict[int, str] = {}
    for w, toks in enumerate(_word_tokens(enc, words)):
        for k in toks:
            owner.setdefault(k, labels[w])
    n, trail = len(enc.tokens), enc.n_trailing_special
    keep = n - trail if limit is None else min(limit - trail, n - trail)
    rows = [TokenRow(k, enc.tokens[k], owner.get(k, "")) for k in range(keep)]
    rows += [TokenRow(keep + j, enc.tokens[n - trail + j], "") for j in range(trail)]
    rows += [TokenRow(k, enc.tokens[k], owner.get(k, ""), True) for k in range(keep, n - trail)]
    return rows


def format_table(tables: dict[str, list[TokenRow]]) -> str:
    """Render token tables side by side, one column group (index, token, word) per encoder.

    Truncated tokens show ``-`` as index, and a footnote explains it."""
    if not tables:
        return ""
    groups = []
    for name, rows in tables.items():
        cells = [("-" if r.truncated else str(r.index), r.token, r.word) for r in rows]
        head = ("#", "token", "word")
        w = [max(len(c[j]) for c in [head, *cells]) for j in range(3)]
        lines = [f"{c[0]:>{w[0]}}  {c[1]:<{w[1]}}  {c[2]:<{w[2]}}" for c in [head, *cells]]
        width = max(len(line) for line in [name, *lines])
        lines = [name.ljust(width), "-" * width] + [line.ljust(width) for line in lines]
        groups.append(lines)
    height = max(len(g) for g in groups)
    for g in groups:
        g.extend([" " * len(g[0])] * (height - len(g)))
    out = ["  |  ".join(g[i] for g in groups).rstrip() for i in range(height)]
    if any(r.truncated for rows in tables.values() for r in rows):
        out.append("index '-': beyond the encoder's max length, truncated away (the model never sees it)")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ pipelines


def _unwrap(pipe: Any) -> Any:
    if not hasattr(pipe, "tokenizer") and hasattr(pipe, "pipe"):
        return pipe.pipe  # a ControlledPipeline wrapping a diffusers pipeline
    return pipe


def encoder_tokenizers(pipe: Any) -> dict[str, Any]:
    """The pipeline's tokenizers in order, keyed by attribute (``tokenizer``, ``tokenizer_2``,
    ``tokenizer_3``), skipping absent or ``None`` ones."""
    pipe = _unwrap(pipe)
    names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    return {n: t for n in names if (t := getattr(pipe, n, None)) is not None}


def _family(pipe: Any, family: str | None) -> str:
    """`family` validated; when None, the family of `pipe` (`attnctrl.models.loading.family_of`).

    A `ControlledPipeline` gives its ``family``; a diffusers pipeline is read by ``family_of``. A
    run's `attnctrl.state.TextEncoders` has no denoiser to read the family from: pass `family`.
    Other stand-ins (tokenizer attributes only, no ``components``) are read by their tokenizers:
    ``tokenizer_3`` → sd3, a T5 ``tokenizer_2`` → flux, another ``tokenizer_2`` → sdxl, else sd.
    """
    if family is not None:
        f = family.lower()
        if f not in _FAMILIES:
            raise TokenError(f"unknown model family {family!r}; expected one of {', '.join(_FAMILIES)}")
        return f
    from .state import TextEncoders

    if isinstance(pipe, TextEncoders):
        raise TokenError("a run's TextEncoders has no model family: pass family= (the run's RunContext.family)")
    own = getattr(pipe, "family", None)
    if isinstance(own, str) and own in _FAMILIES:
        return own  # a ControlledPipeline
    inner = _unwrap(pipe)
    if isinstance(getattr(inner, "components", None), dict):
        from .models.loading import family_of

        return family_of(inner)
    # a stand-in with tokenizers only: what its tokenizers say
    if hasattr(inner, "tokenizer_3"):
        return "sd3"
    tok2 = getattr(inner, "tokenizer_2", None)
    if "t5" in type(tok2).__name__.lower():
        return "flux"
    return "sdxl" if tok2 is not None else "sd"


def _t5_name(family: str) -> str | None:
    return {"sd3": "tokenizer_3", "flux": "tokenizer_2"}.get(family)


def encoder_max_lengths(
    pipe: Any, *, family: str | None = None, max_sequence_length: int | None = None
) -> dict[str, int | None]:
    """Per tokenizer attribute, the length the pipeline pads/truncates its prompt to: the CLIP
    tokenizers' ``model_max_length`` (77), and for the T5 tokenizer of SD3/FLUX the call's
    ``max_sequence_length`` (diffusers' defaults: 256 for SD3, 512 for FLUX)."""
    fam = _family(pipe, family)
    t5 = _t5_name(fam)
    out: dict[str, int | None] = {}
    for name, tok in encoder_tokenizers(pipe).items():
        if name == t5:
            out[name] = int(max_sequence_length or _T5_DEFAULT[fam])
        else:
            out[name] = _max_length(tok, None)
    return out


def resolve_all(
    pipe: Any,
    prompt: str,
    spec: TokenSpec,
    *,
    family: str | None = None,
    max_sequence_length: int | None = None,
) -> dict[str, list[int]]:
    """:func:`resolve` ``spec`` for every tokenizer of ``pipe`` (keyed as in
    :func:`encoder_tokenizers`), each against the length its encoder is fed."""
    limits = encoder_max_lengths(pipe, family=family, max_sequence_length=max_sequence_length)
    return {name: resolve(tok, prompt, spec, max_length=limits[name]) for name, tok in encoder_tokenizers(pipe).items()}


def token_tables(
    pipe: Any, prompt: str, *, family: str | None = None, max_sequence_length: int | None = None
) -> dict[str, list[TokenRow]]:
    """:func:`token_table` for every tokenizer of ``pipe``; feed the result to :func:`format_table`."""
    limits = encoder_max_lengths(pipe, family=family, max_sequence_length=max_sequence_length)
    return {name: token_table(tok, prompt, max_length=limits[name]) for name, tok in encoder_tokenizers(pipe).items()}


def joint_text_indices(
    pipe: Any,
    prompt: str,
    spec: TokenSpec,
    family: str | None = None,
    *,
    max_sequence_length: int | None = None,
) -> list[int]:
    """Indices of ``spec`` among the text tokens *as the attention layers see them*.

    - ``sd`` / ``sdxl``: the CLIP sequence (77 tokens, BOS at 0). SDXL's two CLIP encoders are
      concatenated feature-wise, so one set of positions serves both.
    - ``sd3``: the joint text sequence is ``[CLIP (77), T5 (max_sequence_length)]`` (the two CLIPs
      concatenated feature-wise, then T5 appended along the sequence), so the result is the CLIP
      indices followed by ``77 + i`` for each T5 index ``i``. Without a T5 tokenizer (T5 dropped,
      diffusers fills its part with zeros) only the CLIP indices are returned.
    - ``flux``: the joint attention text tokens are T5 only (CLIP gives just the pooled vector),
      so the result is the T5 indices.

    Raw int specs are indices into this joint sequence already and are only range-checked.
    ``family`` is inferred from the pipeline class when not given.
    """
    fam = _family(pipe, family)
    toks = encoder_tokenizers(pipe)
    limits = encoder_max_lengths(pipe, family=fam, max_sequence_length=max_sequence_length)
    t5 = _t5_name(fam)
    clip_len = limits.get("tokenizer") or 77
    if fam == "sd3":
        clip_len = int(getattr(_unwrap(pipe), "tokenizer_max_length", clip_len))

    if not isinstance(spec, str):
        _check_prompt(prompt)
        if fam in ("sd", "sdxl"):
            total = clip_len
        elif fam == "sd3":
            total = clip_len + int(max_sequence_length or _T5_DEFAULT["sd3"])
        else:
            total = int(max_sequence_length or _T5_DEFAULT["flux"])
        return _raw_indices(spec, total, prompt)

    if fam in ("sd", "sdxl"):
        return resolve(toks["tokenizer"], prompt, spec, max_length=clip_len)
    if fam == "sd3":
        idx = resolve(toks["tokenizer"], prompt, spec, max_length=clip_len)
        if t5 in toks:
            idx += [clip_len + i for i in resolve(toks[t5], prompt, spec, max_length=limits[t5])]
        return idx
    if t5 not in toks:
        raise TokenError("this FLUX pipeline has no T5 tokenizer (tokenizer_2): its text tokens are T5 tokens")
    return resolve(toks[t5], prompt, spec, max_length=limits[t5])
