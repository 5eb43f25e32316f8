"""Noun phrases of a prompt, for controls that work phrase by phrase (`StructuredGuidance`).

StructureDiffusion (Feng et al., ICLR 2023, §3.2) takes the noun phrases of a constituency parse
of the prompt. attnctrl finds them from the first source available:

1. phrases the user gives (``phrases=["a red car", "a white sheep"]``; ``"dog#2"`` picks the second
   occurrence, as in `attnctrl.tokens`);
2. spaCy's noun chunks, when spaCy and an English model (``en_core_web_sm``) are installed;
3. a built-in rule-based chunker that needs no download: small lexicons of determiners, numerals,
   adjectives and colours, prepositions, conjunctions, pronouns and common verbs, and the pattern
   *(determiner | numeral)* *modifier* noun+ (modifiers: adjectives, colours, participles such as
   "sleeping", coordinated adjectives "red and white"). It finds base noun phrases, like spaCy's
   noun chunks: ``"a brown dog sitting on a blue bench next to a green umbrella"`` →
   ``a brown dog | a blue bench | a green umbrella``.

Words are those of `attnctrl.tokens` (runs of letters and digits), so a `Phrase`'s word range and
its ``spec`` resolve to token indices with `attnctrl.tokens.resolve`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .tokens import (  # one word definition and spec syntax for both
    _WORD,
    TokenError,
    _parse_spec,
)

__all__ = ["Phrase", "find_phrase", "noun_phrases", "rule_noun_phrases", "spacy_available", "spacy_noun_phrases"]

Backend = Literal["auto", "spacy", "rules"]

_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")  # words and single punctuation marks


@dataclass(frozen=True)
class Phrase:
    """A phrase of a prompt: words ``start_word`` (inclusive) to ``end_word`` (exclusive) of
    `attnctrl.tokens.prompt_words(prompt)`, ``text`` as written in the prompt (characters
    ``start_char:end_char``), and ``occurrence``: which occurrence of these words it is."""

    text: str
    start_word: int
    end_word: int
    start_char: int = 0
    end_char: int = 0
    occurrence: int = 1

    @property
    def num_words(self) -> int:
        return self.end_word - self.start_word

    @property
    def spec(self) -> str:
        """The token spec of this phrase (``"a dog#2"``) for `attnctrl.tokens.resolve`."""
        words = " ".join(m.group() for m in _WORD.finditer(self.text))
        return words if self.occurrence == 1 else f"{words}#{self.occurrence}"


# ----------------------------------------------------------------------------------- helpers


def _spans(prompt: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(prompt)]


def _make(prompt: str, words: list[tuple[str, int, int]], a: int, b: int) -> Phrase:
    keys = [w[0].casefold() for w in words]
    occ = sum(1 for i in range(a + 1) if keys[i : i + (b - a)] == keys[a:b])
    return Phrase(prompt[words[a][1] : words[b - 1][2]], a, b, words[a][1], words[b - 1][2], occ)


def find_phrase(prompt: str, phrase: str) -> Phrase:
    """The `Phrase` of ``prompt`` named by ``phrase`` (words, case-insensitive, punctuation
    ignored; ``"dog#2"`` is the second occurrence). Raises `TokenError` if it is not there."""
    if not isinstance(phrase, str):
        raise TokenError(f"a phrase must be a string, got {type(phrase).__name__}: {phrase!r}")
    keys, occurrence, _ = _parse_spec(phrase)
    words = _spans(prompt)
    low = [w[0].casefold() for w in words]
    n = len(keys)
    hits = [i for i in range(len(words) - n + 1) if low[i : i + n] == keys]
    if len(hits) < occurrence:
        where = "is not a phrase of" if not hits else f"occurs only {len(hits)} time(s) in"
        raise TokenError(
            f"{phrase.strip()!r} {where} the prompt {prompt!r}; its words: {' '.join(w[0] for w in words)}"
        )
    a = hits[occurrence - 1]
    return _make(prompt, words, a, a + n)


# ------------------------------------------------------------------------------------ spaCy


@functools.cache
def _spacy_model(name: str = "en_core_web_sm"):
    try:
        import spacy

        return spacy.load(name)
    except (ImportError, OSError, ValueError):  # not installed, or no English model downloaded
        return None


def spacy_available() -> bool:
    """Whether spaCy and its English model ``en_core_web_sm`` load."""
    return _spacy_model() is not None


def spacy_noun_phrases(prompt: str, nlp=None) -> list[Phrase]:
    """spaCy's noun chunks of ``prompt``, as `Phrase` objects (word ranges of attnctrl's words)."""
    nlp = nlp or _spacy_model()
    if nlp is None:
        raise RuntimeError(
            "spaCy with an English model is not available: pip install spacy && python -m spacy download en_core_web_sm"
        )
    words = _spans(prompt)
    out = []
    for chunk in nlp(prompt).noun_chunks:
        inside = [i for i, (_, s, e) in enumerate(words) if s < chunk.end_char and e > chunk.start_char]
        if inside:
            out.append(_make(prompt, words, inside[0], inside[-1] + 1))
    return out


# ----------------------------------------------------------------------------- rule lexicons


def _lexicon(words: str) -> set[str]:
    return set(words.split())


_DET = _lexicon(
    "a an the this that these those my your his her its our their some any each every no another "
    "several many few both all either neither much more most such"
)
_NUM = _lexicon(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty hundred thousand dozen pair couple single"
)
_COLOURS = _lexicon(
    "red green blue yellow orange purple pink brown black white gray grey golden silver gold beige "
    "violet cyan magenta turquoise teal maroon navy crimson scarlet azure indigo ivory tan "
    "colorful colourful multicolored rainbow pale dark light bright transparent striped spotted checkered"
)
_ADJ = (
    _lexicon(
        "small big large tiny huge giant little tall short long wide narrow thick thin fat round square "
        "triangular rectangular circular oval flat curved old young new ancient modern antique vintage "
        "wooden metal metallic plastic glass stone leather woolen wool silk cotton paper ceramic marble "
        "fluffy furry hairy shiny glossy matte soft hard smooth rough wet dry hot cold warm cool frozen "
        "happy sad angry cute beautiful pretty ugly scary funny lonely friendly fierce calm wild tame "
        "hungry sleepy clean dirty empty full open closed heavy fancy elegant simple realistic detailed "
        "cartoon futuristic medieval magical mysterious majestic cozy rustic abstract surreal cinematic "
        "photorealistic fantasy epic gigantic miniature enormous massive delicious fresh ripe rotten "
        "broken rusty shiny sparkling glowing floating flying burning melting tiny sleek"
    )
    | _COLOURS
)
# words that may be the head noun of a phrase although they are also adjectives ("a blue square")
_ADJ_NOUN = _lexicon(
    "square round orange gold silver plastic glass stone paper marble leather wool silk cotton metal cartoon fantasy rainbow light cream"
)
_PREP = _lexicon(
    "on in at above below under over beneath underneath beside besides behind near with without of by "
    "from into onto inside outside between among across through against along around for atop upon "
    "toward towards like than off via within beyond past after before during next to up down amid "
    "alongside opposite"
)
# nouns used as prepositions before "of": "in front of", "on top of", "to the left of"
_RELATION = _lexicon("front top left right side bottom middle back edge center centre corner inside outside")
_CONJ = _lexicon("and or but nor while as plus then so yet whereas")
_PRON = _lexicon(
    "it he she they them him we us you i me itself himself herself themselves there here which who whom "
    "whose what where when how why something someone anything everything nothing"
)
_ADV = _lexicon("very really quite extremely slightly too so rather fairly highly incredibly super partly mostly")
_AUX = _lexicon(
    "is are was were be being been am has have had do does did will would can could should may might must not"
)
_VERB_BASES = _lexicon(
    "sit stand hold wear ride eat drink play look lie fly run walk jump swim sleep read write chase carry "
    "watch sing dance fight climb drive throw catch kick lean rest hang float grow cross wait pull push hug "
    "kiss lick bite smile laugh cry cook surf skate ski hide sniff stare gaze perch rest roll sail shine "
    "glow burn melt fall stretch reach touch cover fill face meet follow lead greet hunt graze roam wander "
    "peek sip paint draw make take give hit set rise shine point smell bark fetch glide soar hover"
)
_NOT_VERB_ING = _lexicon(
    "painting building ring king wing string ceiling clothing swing thing evening morning pudding earring "
    "wedding icing dumpling sing spring sling bling lightning beijing viking duckling sibling seedling "
    "stuffing frosting awning railing landing stocking bedding topping carving drawing sapling herring"
)
_NOT_VERB_ED = _lexicon("bed shed sled seed weed steed reed tweed breed hundred red bred speed need feed fred ted")


def _verb_forms(base: str) -> set[str]:
    forms = {base}
    if base.endswith(("s", "sh", "ch", "x", "z")):
        forms.add(base + "es")
    elif base.endswith("y") and base[-2] not in "aeiou":
        forms.add(base[:-1] + "ies")
    else:
        forms.add(base + "s")
    if base.endswith("ie"):
        forms.add(base[:-2] + "ying")
    elif base.endswith("e") and not base.endswith("ee"):
        forms.add(base[:-1] + "ing")
    elif len(base) >= 3 and base[-1] not in "aeiouwxy" and base[-2] in "aeiou" and base[-3] not in "aeiou":
        forms.add(base + base[-1] + "ing")
        forms.add(base + "ing")  # e.g. "visiting"; harmless if unused
    else:
        forms.add(base + "ing")
    return forms


_VERBS = set().union(*(_verb_forms(b) for b in _VERB_BASES)) | {
    "sat",
    "stood",
    "held",
    "wore",
    "worn",
    "rode",
    "ridden",
    "ate",
    "eaten",
    "drank",
    "lay",
    "flew",
    "ran",
    "swam",
    "slept",
    "caught",
    "threw",
    "hung",
    "grew",
    "fell",
    "made",
    "took",
    "gave",
    "seen",
    "sees",
    "standing",
    "sitting",
    "lying",
}
_VERBS -= _NOT_VERB_ING


def _participle(w: str) -> bool:
    """-ing / -ed forms that are not nouns ("sleeping", "stuffed"; not "painting", "bed")."""
    return (len(w) > 4 and w.endswith("ing") and w not in _NOT_VERB_ING) or (
        len(w) > 3 and w.endswith("ed") and w not in _NOT_VERB_ED
    )


def _is_adj(w: str) -> bool:
    return w in _ADJ


def _closed(w: str) -> bool:
    """Closed-class words never inside a noun phrase's modifiers or head."""
    return w in _PREP or w in _CONJ or w in _PRON or w in _AUX or w in _DET


# ------------------------------------------------------------------------------- rule chunker


def rule_noun_phrases(prompt: str) -> list[Phrase]:
    """Base noun phrases of ``prompt`` by the built-in rules (no model, no download).

    Pattern: *(determiner | numeral)* *(adverb? adjective | participle | "'s")* noun+, where
    unknown words are nouns; punctuation other than a comma between adjectives ends a phrase;
    after the head noun, a known verb or participle ends the phrase ("an astronaut | riding |
    a horse"), as does an unknown word directly followed by a determiner ("a dog | chases | a cat").
    """
    toks = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(prompt)]
    words = _spans(prompt)
    word_at = {s: i for i, (_, s, _) in enumerate(words)}
    low = [t[0].casefold() for t in toks]
    is_word = [bool(_WORD.fullmatch(t[0])) for t in toks]
    n = len(toks)

    def word(j: int) -> str | None:
        return low[j] if 0 <= j < n and is_word[j] else None

    def content(j: int) -> bool:
        w = word(j)
        return w is not None and not _closed(w) and w not in _ADV and w not in _NUM and not w.isdigit()

    phrases: list[Phrase] = []
    i = 0
    while i < n:
        w = word(i)
        if w is None:
            i += 1
            continue
        start = i
        j = i
        has_det = False
        while (wj := word(j)) is not None and (wj in _DET or wj in _NUM or wj.isdigit()):
            if word(j) in ("that", "this", "these", "those") and not content(j + 1) and word(j + 1) not in _ADV:
                break  # pronoun use: "that is ..."
            has_det = True
            j += 1
        mods: list[str] = []  # kinds of the words taken: "adj" | "noun" | "part"
        k = j
        while k < n:
            w = word(k)
            if w is None:
                # a comma between two adjectives ("a big, fluffy dog") stays inside the phrase
                if low[k] == "," and mods and mods[-1] == "adj" and (nw := word(k + 1)) is not None and _is_adj(nw):
                    k += 1
                    continue
                if low[k] == "'" and word(k + 1) == "s" and mods and mods[-1] == "noun":  # possessive "man's"
                    k += 2
                    continue
                break
            if w in _ADV:
                nxt = word(k + 1)
                if nxt is not None and (_is_adj(nxt) or _participle(nxt)):
                    k += 1
                    continue
                break
            if w in _CONJ and w in ("and", "or") and mods and mods[-1] == "adj":
                nxt = word(k + 1)
                if nxt is not None and _is_adj(nxt) and content(k + 2):  # "a red and white bus"
                    k += 1
                    continue
                break
            if not content(k):
                break
            after_noun = "noun" in mods
            if w in _RELATION and word(k + 1) == "of" and not mods:
                break  # "in front of", "on top of", "to the left of"
            if w in _VERBS or w in _AUX:
                if not mods and has_det:
                    mods.append("noun")  # "a drink", "the ride": first word after a determiner
                    k += 1
                    continue
                if not mods and not has_det and not content(k + 1):
                    break  # "... riding" at the start of a run without determiner
                if after_noun or not has_det:
                    break
                mods.append("part")
                k += 1
                continue
            if _participle(w) and not _is_adj(w):
                if after_noun or (not mods and not has_det):
                    break  # "a cat sleeping ...", "sitting on ..."
                mods.append("part")
                k += 1
                continue
            if _is_adj(w) and not (w in _ADJ_NOUN and not content(k + 1)):
                if after_noun:
                    break  # "a car red ..." : the adjective starts no new modifier inside the phrase
                mods.append("adj")
                k += 1
                continue
            # a noun (unknown words are nouns); after the head noun, an unknown word directly followed
            # by a determiner is a verb: "a dog chases a cat"
            if after_noun and word(k + 1) is not None and (word(k + 1) in _DET or word(k + 1) in _NUM):
                break
            mods.append("noun")
            k += 1
        # the phrase ends at its last word taken (trailing adverbs, conjunctions, commas dropped)
        last = k
        while last > j and (word(last - 1) is None or word(last - 1) in _ADV or word(last - 1) in _CONJ):
            last -= 1
        if "noun" in mods and last > j:
            a = word_at[toks[start][1]]
            b = word_at[toks[last - 1][1]] + 1
            phrases.append(_make(prompt, words, a, b))
            i = last
        else:
            i = start + 1
    return phrases


# ------------------------------------------------------------------------------------ public


def noun_phrases(
    prompt: str,
    phrases: Sequence[str] | None = None,
    backend: Backend = "auto",
) -> list[Phrase]:
    """Noun phrases of ``prompt``, in prompt order.

    ``phrases`` given: each is located in the prompt (`find_phrase`; an unknown phrase is a
    `TokenError`). Otherwise ``backend``: ``"spacy"`` (spaCy noun chunks; error if unavailable),
    ``"rules"`` (the built-in chunker) or ``"auto"`` (spaCy if an English model loads, else rules).
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise TokenError("the prompt is empty: there are no noun phrases to find")
    if phrases is not None:
        if isinstance(phrases, str):
            phrases = [phrases]
        found = [find_phrase(prompt, p) for p in phrases]
        return sorted(found, key=lambda p: (p.start_word, p.end_word))
    if backend not in ("auto", "spacy", "rules"):
        raise ValueError(f"backend must be 'auto', 'spacy' or 'rules', got {backend!r}")
    if backend == "spacy" or (backend == "auto" and spacy_available()):
        return spacy_noun_phrases(prompt)
    return rule_noun_phrases(prompt)
