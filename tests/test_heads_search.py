"""HeadHunter head search (`attnctrl.pipelines.head_search`, arXiv:2506.10978): picks agree with a hand evaluation,
the found heads round-trip through JSON, searches resume from their cache, CLI, user scorers, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from attnctrl import HeadPerturbation
from attnctrl.cli import main
from attnctrl.pipelines import ControlledPipeline
from attnctrl.pipelines.head_search import HeadSearchResult, candidate_heads, search_heads
from attnctrl.scorers import SCORERS, apply_scorer, colorfulness, contrast, get_scorer, gradient, scorer_id, sharpness
from conftest import _cached

PROMPTS = ["a red car and a white sheep"]
SEEDS = [0]
STEPS = 2
CANDIDATES = ["mid", "down_blocks.1"]
MID = "mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def pipe():
    return ControlledPipeline(_cached("tiny-sd"))


def generate(pipe, prompts, seed, controls=(), output_type="pil"):
    """One call exactly as the search makes it: a CPU generator per prompt, all seeded with `seed`."""
    gens = [torch.Generator("cpu").manual_seed(seed) for _ in prompts]
    return pipe(
        list(prompts), controls=list(controls), generator=gens, num_inference_steps=STEPS, output_type=output_type
    )


class Change:
    """Deterministic test scorer: mean |image − unperturbed image| (0-255), seed-major like the search."""

    scorer_name = "test-change"

    def __init__(self, pipe):
        self.refs = [np.asarray(im, dtype=np.float64) for s in SEEDS for im in generate(pipe, PROMPTS, s).images]

    def __call__(self, images, prompts):
        assert prompts == [p for _ in SEEDS for p in PROMPTS]
        return [float(np.abs(np.asarray(im, dtype=np.float64) - ref).mean()) for im, ref in zip(images, self.refs)]


class Calls:
    """Counts `ControlledPipeline.__call__` (every generation of the search goes through it)."""

    def __init__(self, monkeypatch):
        self.n = 0
        original = ControlledPipeline.__call__

        def counted(pipe_self, *args, **kwargs):
            self.n += 1
            return original(pipe_self, *args, **kwargs)

        monkeypatch.setattr(ControlledPipeline, "__call__", counted)


def hand_score(pipe, scorer, heads) -> float:
    control = [HeadPerturbation(heads=list(heads), scale=3.0, softness=1.0)] if heads else []
    images = [im for s in SEEDS for im in generate(pipe, PROMPTS, s, control).images]
    values = scorer(images, [p for _ in SEEDS for p in PROMPTS])
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def searched(pipe, tmp_path_factory):
    """One search in three sittings on one cache: rounds=1, extended to rounds=3, then repeated."""
    cache = tmp_path_factory.mktemp("heads-cache")
    scorer = Change(pipe)
    mp = pytest.MonkeyPatch()
    try:
        calls = Calls(mp)
        kw = dict(scorer=scorer, top_k=3, candidates=CANDIDATES, steps=STEPS, cache_dir=cache, progress=False)
        short = search_heads(pipe, PROMPTS, SEEDS, rounds=1, **kw)
        calls_short, calls.n = calls.n, 0
        full = search_heads(pipe, PROMPTS, SEEDS, rounds=3, **kw)
        calls_full, calls.n = calls.n, 0
        again = search_heads(pipe, PROMPTS, SEEDS, rounds=3, **kw)
        calls_again = calls.n
    finally:
        mp.undo()
    return dict(
        scorer=scorer, cache=cache, short=short, full=full, again=again, calls=(calls_short, calls_full, calls_again)
    )


# ------------------------------------------------------------------------------ the search


def test_candidates_are_the_self_attention_heads_of_the_selected_layers(pipe):
    hand = [
        (layer.name, h)
        for layer in pipe.layers()
        if layer.kind == "self" and layer.name.startswith(("mid_block.", "down_blocks.1."))
        for h in range(layer.heads)
    ]
    assert len(hand) == 8 and sorted(candidate_heads(pipe, CANDIDATES)) == sorted(hand)  # attn2 (cross) skipped
    assert candidate_heads(pipe, "mid,heads=1|3") == [(MID, 1), (MID, 3)]
    with pytest.raises(ValueError, match="no self-attention layer"):
        candidate_heads(pipe, "cross,mid")


@pytest.mark.slow
def test_first_pick_is_the_argmax_of_a_hand_evaluation(pipe, searched):
    result, scorer = searched["full"], searched["scorer"]
    round0 = result.history[0]
    tried = {(layer, h): s for (layer, h), s in ((e["head"], e["score"]) for e in round0["tried"])}
    hand = {head: hand_score(pipe, scorer, [head]) for head in candidate_heads(pipe, CANDIDATES)}
    assert tried.keys() == hand.keys()
    for head, value in hand.items():
        assert tried[head] == pytest.approx(value, rel=1e-9, abs=1e-12), head
    assert len(set(hand.values())) == len(hand)  # no ties: the argmax is unambiguous
    best = max(hand, key=hand.get)
    assert result.heads[0] == best and round0["picked"] == list(best)
    assert result.baseline == pytest.approx(0.0)  # unperturbed images equal the reference


def test_later_rounds_try_the_top_k_remaining_singles_and_keep_improvements(pipe, searched):
    result, scorer = searched["full"], searched["scorer"]
    single = {tuple(e["head"]): e["score"] for e in result.history[0]["tried"]}
    ranking = sorted(single, key=lambda h: -single[h])
    assert len(result.heads) >= 2, result.history  # perturbing more heads changes the image more
    chosen = [result.heads[0]]
    for entry in result.history[1:]:
        assert entry["base"] == [list(h) for h in chosen]
        shortlist = [h for h in ranking if h not in chosen][:3]
        assert [tuple(e["head"]) for e in entry["tried"]] == shortlist
        if entry["round"] == 1:  # re-evaluate the additions of round 1 by hand
            for e in entry["tried"]:
                assert e["score"] == pytest.approx(hand_score(pipe, scorer, chosen + [tuple(e["head"])]), rel=1e-9)
        best = max(entry["tried"], key=lambda e: e["score"])
        if entry["picked"] is not None:
            assert entry["picked"] == best["head"] and best["score"] > result.history[entry["round"] - 1]["score"]
            chosen.append(tuple(best["head"]))
        else:
            assert best["score"] <= entry["score"]
    assert result.heads == chosen and len(chosen) <= 3
    assert result.score == result.history[-1]["score"]
    assert result.scorer == "test-change" and result.settings["steps"] == STEPS


def test_found_heads_roundtrip_through_json_with_identical_images(pipe, searched, tmp_path):
    result = searched["full"]
    path = result.to_json(tmp_path / "heads.json")
    data = json.loads(path.read_text())
    assert data["heads"] == [[layer, h] for layer, h in result.heads]
    assert {"heads", "score", "scorer", "settings", "history"} <= data.keys()
    assert data["score"] == result.score and data["settings"]["candidates"] == CANDIDATES
    assert HeadSearchResult.from_json(path).heads == result.heads
    from_file = generate(pipe, PROMPTS, 0, [HeadPerturbation(heads=str(path), scale=3.0)])
    from_list = generate(pipe, PROMPTS, 0, [HeadPerturbation(heads=result.heads, scale=3.0)])
    assert torch.equal(from_file.latents, from_list.latents)
    assert np.array_equal(np.asarray(from_file.images[0]), np.asarray(from_list.images[0]))
    plain = generate(pipe, PROMPTS, 0)
    assert not torch.equal(plain.latents, from_file.latents)  # the heads do perturb
    assert result.perturbation().layers == HeadPerturbation(heads=str(path)).layers


def test_search_resumes_from_its_cache(searched):
    short, full, again = searched["short"], searched["full"], searched["again"]
    calls_short, calls_full, calls_again = searched["calls"]
    n_single = len(short.history[0]["tried"])
    assert calls_short == (1 + n_single) * len(SEEDS) and short.generated == 1 + n_single  # baseline + singles
    later = sum(len(e["tried"]) for e in full.history[1:])
    assert full.cached == 1 + n_single and full.generated == later and calls_full == later * len(SEEDS)
    assert calls_again == 0 and again.generated == 0 and again.cached == 1 + n_single + later
    assert (again.heads, again.score, again.history, again.baseline) == (
        full.heads,
        full.score,
        full.history,
        full.baseline,
    )
    assert short.heads == full.heads[:1]
    files = list(searched["cache"].glob("heads-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["evaluations"]) == 1 + n_single + later


def test_other_settings_do_not_reuse_the_cache(pipe, searched, monkeypatch):
    calls = Calls(monkeypatch)
    result = search_heads(
        pipe,
        PROMPTS,
        SEEDS,
        searched["scorer"],
        rounds=1,
        top_k=1,
        candidates=f"name={MID},heads=0",
        scale=2.0,
        steps=STEPS,
        cache_dir=searched["cache"],
        progress=False,
        baseline=False,
    )
    assert calls.n == len(SEEDS) and result.generated == 1 and result.heads == [(MID, 0)]
    assert len(list(searched["cache"].glob("heads-*.json"))) == 2


# ------------------------------------------------------------------------------ scorers


def test_builtin_scorers_measure_what_they_say():
    rng = np.random.default_rng(0)
    flat = Image.new("RGB", (32, 32), (120, 120, 120))
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    blurred = Image.fromarray(np.asarray(noise.resize((8, 8)).resize((32, 32), Image.BILINEAR)))
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    for fn in (sharpness, contrast, gradient, colorfulness):
        assert fn([flat], [""]) == [pytest.approx(0.0, abs=1e-12)], fn.__name__
    assert sharpness([noise], [""])[0] > sharpness([blurred], [""])[0] > 0
    assert gradient([noise], [""])[0] > gradient([blurred], [""])[0]
    assert (
        colorfulness([red], [""])[0] == pytest.approx(0.3 * math.hypot(255, 127.5))
        and contrast([noise], [""])[0] > contrast([blurred], [""])[0]
    )
    assert set(SCORERS) >= {"sharpness", "contrast", "gradient", "colorfulness"}
    assert get_scorer("sharpness") is sharpness and scorer_id(sharpness) == "sharpness"


def test_user_scorer_from_module_path(pipe, tmp_path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "import numpy as np\n"
        "def brightness(images, prompts):\n"
        "    return [float(np.asarray(im).mean()) for im in images]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_scorer("my_scorers:brightness")
    assert fn.__name__ == "brightness"
    result = search_heads(
        pipe,
        PROMPTS,
        SEEDS,
        "my_scorers:brightness",
        rounds=1,
        top_k=1,
        candidates="mid,heads=0|1",
        steps=STEPS,
        progress=False,
        baseline=False,
    )
    hand = {(MID, h): hand_score(pipe, fn, [(MID, h)]) for h in (0, 1)}
    assert result.scorer == "my_scorers:brightness" and result.heads == [max(hand, key=hand.get)]
    with pytest.raises(ValueError, match="cannot import"):
        get_scorer("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute"):
        get_scorer("my_scorers:missing")
    with pytest.raises(ValueError, match="not callable"):
        get_scorer("os:sep")
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*sharpness"):
        get_scorer("nope")


def test_scorer_output_is_checked():
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="returned 1 scores for 2 images"):
        apply_scorer(lambda ims, ps: [1.0], [img, img], ["a", "a"])
    with pytest.raises(ValueError, match="non-finite"):
        apply_scorer(lambda ims, ps: [math.nan], [img], ["a"])
    assert apply_scorer(lambda ims, ps: np.array([2]), [img], ["a"]) == [2.0]


def test_bad_search_arguments(pipe):
    ok = dict(prompts=PROMPTS, seeds=SEEDS, scorer="sharpness", rounds=1, top_k=1, candidates="mid", steps=STEPS)
    for change, match in [
        ({"rounds": 0}, "rounds must be a positive integer"),
        ({"top_k": -1}, "top_k"),
        ({"prompts": []}, "prompts"),
        ({"prompts": ["  "]}, "prompts"),
        ({"seeds": [-1]}, "seeds"),
        ({"scale": 0}, "scale must be a number > 0"),
        ({"softness": 0}, "softness"),
        ({"scorer": "nope"}, "unknown scorer"),
        ({"candidates": "cross"}, "no self-attention layer"),
        ({"steps": 0}, "steps must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            search_heads(pipe, **{**ok, **change}, progress=False)
    with pytest.raises(TypeError, match="generator"):
        search_heads(pipe, **ok, progress=False, generator=torch.Generator())


# ---------------------------------------------------------------------------------- CLI


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.slow
def test_cli_search_writes_json_and_resumes(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car and a white sheep\n\n  a cat on a mat  \n")
    out, cache = tmp_path / "heads.json", tmp_path / "cache"
    argv = [
        "heads",
        "search",
        "--model",
        "tiny-sd",
        "--prompts",
        prompts,
        "--seeds",
        1,
        "--rounds",
        2,
        "--top-k",
        1,
        "--scorer",
        "sharpness",
        "--candidates",
        "mid,heads=0|1;down_blocks.1,heads=2",
        "--steps",
        STEPS,
        "--cache",
        cache,
        "--no-progress",
        "-o",
        out,
    ]
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("tiny-sd (sd): 3 candidate heads in 2 layers; 2 prompts x 1 seed; scorer sharpness")
    assert lines[1].startswith("baseline (no perturbation)") and lines[2].startswith("round 0  + ")
    assert lines[-1] == str(out) and not list(tmp_path.glob(".*.tmp"))
    data = json.loads(out.read_text())
    assert data["scorer"] == "sharpness" and 1 <= len(data["heads"]) <= 2
    assert data["settings"]["prompts"] == ["a red car and a white sheep", "a cat on a mat"]
    assert (data["settings"]["steps"], data["settings"]["seeds"], data["settings"]["model"]) == (STEPS, [0], "tiny-sd")
    HeadPerturbation(heads=str(out))  # loadable

    calls = Calls(monkeypatch)
    rc, stdout2, err = run(capsys, *argv)
    assert rc == 0, err
    assert calls.n == 0 and "0 head sets evaluated" in stdout2 and "read from" in stdout2
    assert json.loads(out.read_text())["heads"] == data["heads"]


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    out = tmp_path / "heads.json"
    base = ["heads", "search", "--model", "tiny-sd", "--scorer", "sharpness", "-o", out]
    cases = [
        (["--prompts", tmp_path / "missing.txt"], "does not exist"),
        (["--prompts", empty], "has no prompts"),
        (["--prompts", prompts, "--scorer", "nope"], "unknown scorer 'nope'"),
        (["--prompts", prompts, "--scorer", "no_such_module_xyz:f"], "cannot import"),
        (["--prompts", prompts, "--seeds", 0], "--seeds"),
        (["--prompts", prompts, "--rounds", -1], "--rounds"),
        (["--prompts", prompts, "--top-k", 0], "--top-k"),
        (["--prompts", prompts, "--steps", 0], "--steps"),
        (["--prompts", prompts, "--scale", 0], "--scale"),
        (["--prompts", prompts, "--softness", 1.5], "--softness"),
        (["--prompts", prompts, "--candidates", "mid;bad term!"], "cannot read selector term"),
        (["--prompts", prompts, "-o", tmp_path / "heads.txt"], "must end in .json"),
        (["--prompts", prompts, "-o", tmp_path / "nodir" / "h.json"], "does not exist"),
    ]
    for extra, match in cases:
        rc, _, err = run(capsys, *base, *extra)
        assert rc == 2, (extra, err)
        assert err.startswith("attnctrl: error:") and len(err.strip().splitlines()) == 1 and match in err, (extra, err)
    rc, _, err = run(capsys, "heads")
    assert rc == 2 and "choose an action: search" in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
