"""The noun-phrase chunker: built-in rules, user phrases, and the spaCy path (mocked)."""

from types import SimpleNamespace

import pytest

from attnctrl import phrases
from attnctrl.phrases import Phrase, find_phrase, noun_phrases, rule_noun_phrases
from attnctrl.tokens import TokenError, prompt_words

CASES = [
    ("a red car and a white sheep", ["a red car", "a white sheep"]),
    (
        "a brown dog sitting on a blue bench next to a green umbrella",
        ["a brown dog", "a blue bench", "a green umbrella"],
    ),
    ("two cats and a dog", ["two cats", "a dog"]),
    ("an astronaut riding a horse", ["an astronaut", "a horse"]),
    ("a small red circle above a big blue square", ["a small red circle", "a big blue square"]),
    ("A red teddy bear in a christmas hat sitting next to a glass", ["A red teddy bear", "a christmas hat", "a glass"]),
    ("a painting of a virus monster playing guitar", ["a painting", "a virus monster", "guitar"]),
    ("a dog chases a cat, a bird flies over the lake", ["a dog", "a cat", "a bird", "the lake"]),
    ("the car is red", ["the car"]),
    ("a big, fluffy dog and a red and white bus", ["a big, fluffy dog", "a red and white bus"]),
    ("a cat in front of a house", ["a cat", "a house"]),
    ("to the left of a tree is a cat", ["a tree", "a cat"]),
    ("3 apples on a plate", ["3 apples", "a plate"]),
    ("a very large dog", ["a very large dog"]),
    ("cats and dogs", ["cats", "dogs"]),
    ("a photo of a sleeping cat", ["a photo", "a sleeping cat"]),
    ("two flies on a drink", ["two flies", "a drink"]),
    ("an orange on a table", ["an orange", "a table"]),
    ("a man holding an umbrella", ["a man", "an umbrella"]),
    ("a woman wearing a red hat and blue shoes", ["a woman", "a red hat", "blue shoes"]),
    ("the sun sets behind the mountains", ["the sun", "the mountains"]),
    ("a cat that is sleeping on the sofa", ["a cat", "the sofa"]),
    ("A Golden Retriever wearing sunglasses, digital art", ["A Golden Retriever", "sunglasses", "digital art"]),
    ("an oil painting of a fox in the snow", ["an oil painting", "a fox", "the snow"]),
    ("a cup of coffee next to a stack of books", ["a cup", "coffee", "a stack", "books"]),
    ("a stuffed bear and a painted vase", ["a stuffed bear", "a painted vase"]),
    ("a yellow bowl and a blue cat.", ["a yellow bowl", "a blue cat"]),
    ("the two birds", ["the two birds"]),
    ("An old man with a long white beard", ["An old man", "a long white beard"]),
    ("riding a bike", ["a bike"]),
    ("it is raining", []),
    ("a man's hat on the table", ["a man's hat", "the table"]),
]


@pytest.mark.parametrize("prompt, expected", CASES)
def test_rule_chunker(prompt, expected):
    assert [p.text for p in rule_noun_phrases(prompt)] == expected


@pytest.mark.parametrize("prompt, expected", CASES[:12])
def test_phrase_word_ranges_match_prompt_words(prompt, expected):
    words = prompt_words(prompt)
    for p in rule_noun_phrases(prompt):
        assert prompt[p.start_char : p.end_char] == p.text
        assert words[p.start_word : p.end_word] == prompt_words(p.text)


def test_repeated_phrase_gets_its_occurrence():
    found = rule_noun_phrases("a dog next to a cat and a dog")
    assert [(p.text, p.occurrence, p.spec) for p in found] == [
        ("a dog", 1, "a dog"),
        ("a cat", 1, "a cat"),
        ("a dog", 2, "a dog#2"),
    ]
    assert found[2].start_word == 7 and found[2].end_word == 9


def test_user_phrases_are_located():
    got = noun_phrases("A red car and a white sheep", phrases=["a white sheep", "A RED car"])
    assert [(p.text, p.start_word, p.end_word) for p in got] == [("A red car", 0, 3), ("a white sheep", 4, 7)]
    assert find_phrase("a dog and a dog", "a dog#2") == Phrase("a dog", 3, 5, 10, 15, 2)


@pytest.mark.parametrize("phrase, message", [("a blue car", "not a phrase"), ("a dog#3", "only 2"), ("!!", "no word")])
def test_unknown_user_phrase_is_a_clear_error(phrase, message):
    with pytest.raises(TokenError, match=message):
        noun_phrases("a dog and a dog", phrases=[phrase])


def test_empty_prompt_and_bad_backend():
    with pytest.raises(TokenError, match="empty"):
        noun_phrases("  ")
    with pytest.raises(ValueError, match="backend"):
        noun_phrases("a dog", backend="nltk")


class _FakeNLP:
    """Stands in for a spaCy pipeline: noun chunks are given character spans."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __call__(self, text):
        spans = []
        for c in self.chunks:
            s = text.index(c)
            spans.append(SimpleNamespace(start_char=s, end_char=s + len(c), text=c))
        return SimpleNamespace(noun_chunks=spans)


def test_auto_uses_spacy_when_a_model_loads(monkeypatch):
    fake = _FakeNLP(["a red car", "a white sheep"])
    monkeypatch.setattr(phrases, "_spacy_model", lambda name="en_core_web_sm": fake)
    got = noun_phrases("a red car and a white sheep")
    assert [(p.text, p.start_word, p.end_word) for p in got] == [("a red car", 0, 3), ("a white sheep", 4, 7)]
    # rules on request even with spaCy present
    fake.chunks = ["sheep"]
    assert [p.text for p in noun_phrases("a red car and a white sheep", backend="rules")] == [
        "a red car",
        "a white sheep",
    ]


def test_auto_falls_back_to_rules_and_spacy_backend_errors_without_model(monkeypatch):
    monkeypatch.setattr(phrases, "_spacy_model", lambda name="en_core_web_sm": None)
    assert [p.text for p in noun_phrases("two cats and a dog")] == ["two cats", "a dog"]
    with pytest.raises(RuntimeError, match="spacy"):
        noun_phrases("two cats and a dog", backend="spacy")
