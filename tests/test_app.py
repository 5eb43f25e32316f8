"""The web app's logic without a browser: schema → fields, requests → runs, exact reproduction,
model cache and locks, readable errors. (Browser tests: tests/test_app_browser.py.)"""

from __future__ import annotations

import shlex
import threading
import time

import numpy as np
import pytest
from PIL import Image

import attnctrl as ac
from attnctrl.app import runner, schema
from attnctrl.app.runner import (
    ModelCache,
    Request,
    build_controls,
    latent_hash,
    run_request,
)
from attnctrl.cli import build_parser, main
from attnctrl.controls.registry import (
    CONTROLS,
    ControlArgError,
    control_params,
    parse_control,
    parse_kwargs,
)
from attnctrl.models.loading import ModelLoadError

PROMPT = "a red car and a white sheep"
STEPS = 3


@pytest.fixture(scope="module")
def cache():
    return ModelCache(2)


# ------------------------------------------------------------------------------------- schema


def test_every_registered_control_gets_a_panel_from_its_schema():
    forms = {p.name: p for p in schema.panels()}
    assert list(forms) == list(CONTROLS)  # registry order = run order
    for name, cls in CONTROLS.items():
        params = control_params(cls)
        panel = forms[name]
        assert panel.cls is cls
        assert [f.name for f in panel.fields] == [p["name"] for p in params]
        for f, p in zip(panel.fields, params):
            assert f.doc == p["doc"] and f.required == p["required"]
            expected = {"int": "int", "float": "float", "bool": "bool"}.get(p["type"], "text")
            assert f.kind == ("choice" if p["choices"] else expected), (name, p)
            if not f.required:
                assert f.item(f.initial()) is None, (name, f.name)  # untouched widget = the default


def test_widget_values_become_cli_items_that_parse_to_the_same_arguments():
    fields = {f.name: f for f in schema.panels({"heads": CONTROLS["heads"]})[0].fields}
    assert fields["softness"].range == (0.0, 1.0)  # "u in [0, 1]" in the doc → a slider
    assert fields["heads"].selector and fields["heads"].required
    with pytest.raises(ControlArgError, match="'heads' is required"):
        fields["heads"].item("")
    items = [
        fields["heads"].item("up,heads=0;mid"),
        fields["scale"].item(2.0),
        fields["softness"].item(0.5),
        fields["steps"].item("0, 0.5"),
        fields["adaptive_scale"].item(0.0),
    ]
    assert items == ["heads=up,heads=0;mid", "scale=2.0", "softness=0.5", "steps=0, 0.5", None]
    kwargs = parse_kwargs(CONTROLS["heads"], [i for i in items if i])
    assert kwargs == {"heads": ["up,heads=0", "mid"], "scale": 2.0, "softness": 0.5, "steps": [0, 0.5]}
    maps = {f.name: f for f in schema.panels({"maps": CONTROLS["maps"]})[0].fields}
    assert maps["resolutions"].item("16,32") == "resolutions=16,32"
    assert schema.format_value(["cross,res=16", "self"], selector=True) == "cross,res=16;self"
    assert schema.format_value([True, None, 1.5]) == "true,none,1.5"


def test_word_fields_are_recognised_and_filled_by_the_chips():
    f = schema.Field("x", "tokens", "list[str]", None, False, True, None, "", word_joiner=",")
    g = schema.Field("x", "groups", "str | list[list[str]]", None, False, True, None, "", word_joiner=";")
    s = schema.Field("x", "subject", "str", None, False, True, None, "", word_joiner=" ")
    assert f.words and g.words and s.words
    assert not schema.Field("x", "tokens", "list[str]", None, False, True, None, "").words  # undeclared
    assert not schema.Field("x", "layers", "selector", None, False, True, None, "", word_joiner=",").words
    chosen = ["red", "car", "sheep"]
    assert (f.fill(chosen), g.fill(chosen), s.fill(chosen)) == ("red, car, sheep", "red;car;sheep", "red car sheep")
    assert runner.word_choices("A dog and a dog, a Dog") == ["A", "dog", "and", "a#2", "dog#2", "a#3", "Dog#3"]


# ----------------------------------------------------------------------------------- requests


def _pil_pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_run_reproduces_through_cli_and_python(cache, tmp_path, capsys, monkeypatch):
    req = Request(
        PROMPT,
        model="tiny-sd",
        seed=5,
        steps=STEPS,
        guidance=6.0,
        controls=[("pag", ["scale=2.0"]), ("maps", ["resolutions=16"])],
    )
    seen = []
    res = run_request(req, cache, progress=lambda done, total, desc: seen.append((done, total)))
    assert seen == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]  # one tick per denoising step, both runs
    assert res.latent_hash != res.baseline_hash  # PAG changes the image
    assert [t[1] for t in res.heatmaps] == ["a", "red", "car", "and", "a#2", "white", "sheep"]

    # the CLI command, run as given
    argv = shlex.split(res.cli)
    assert argv[:2] == ["attnctrl", "generate"] and "--maps" not in argv  # the user's maps control writes maps
    assert argv[argv.index("--control") : argv.index("-o")] == [
        "--control",
        "pag",
        "scale=2.0",
        "--control",
        "maps",
        "resolutions=16",
    ]
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0, capsys.readouterr().err
    with Image.open(tmp_path / "attnctrl.png") as im:
        assert np.array_equal(_pil_pixels(im), _pil_pixels(res.images[0]))
    assert (tmp_path / "attnctrl.maps.png").exists()

    # the Python code, executed
    ns: dict = {}
    exec(compile(res.python, "<app python>", "exec"), ns)
    assert latent_hash(ns["out"].latents) == res.latent_hash
    assert np.array_equal(_pil_pixels(ns["out"].images[0]), _pil_pixels(res.images[0]))
    assert (tmp_path / "attnctrl_0.png").exists() and (tmp_path / "attnctrl_0.maps.png").exists()


def test_maps_only_observe_and_baseline_is_the_stock_call(cache):
    req = Request(PROMPT, model="tiny-sd", seed=1, steps=STEPS, controls=[("pag", [])])
    res = run_request(req, cache)
    pipe = ac.load("tiny-sd")
    plain = pipe(PROMPT, seed=1, num_inference_steps=STEPS, guidance_scale=7.5)
    with_pag = pipe(PROMPT, seed=1, num_inference_steps=STEPS, guidance_scale=7.5, controls=[ac.PAG()])
    assert res.baseline_hash == latent_hash(plain.latents)
    assert res.latent_hash == latent_hash(with_pag.latents)  # + AttentionMaps for the gallery: same image
    assert "--maps" in shlex.split(res.cli) and "ac.AttentionMaps()" in res.python

    only_maps = run_request(Request(PROMPT, model="tiny-sd", seed=1, steps=STEPS), cache)  # no control on: one run
    assert only_maps.latent_hash == only_maps.baseline_hash == latent_hash(plain.latents)
    assert only_maps.note and len(only_maps.heatmaps) == 7


def test_every_request_gets_fresh_control_instances():
    req = Request(PROMPT, controls=[("pag", ["scale=1.5"]), ("maps", [])])
    a, b = build_controls(req), build_controls(req)
    assert [type(c) for c in a] == [type(c) for c in b] == [ac.PAG, ac.AttentionMaps]
    assert all(x is not y for x, y in zip(a, b))
    assert isinstance(build_controls(Request(PROMPT))[-1], ac.AttentionMaps)  # maps added for the gallery


@pytest.mark.parametrize(
    ("req", "pattern"),
    [
        (Request("   "), "prompt is empty"),
        (Request(PROMPT, steps=0), "steps must be an integer >= 1"),
        (Request(PROMPT, width=13.5), "width must be a whole number"),
        (Request(PROMPT, model="/no/such/model"), "no such folder"),
        (Request(PROMPT, controls=[("pag", ["scale=-1"])]), "scale must be a number >= 0"),
        (Request(PROMPT, controls=[("pag", ["layers=down_blocks.7"])]), "matches no attention layer"),
        (Request(PROMPT, controls=[("nope", [])]), "unknown control 'nope'"),
    ],
)
def test_bad_requests_raise_readable_errors(cache, req, pattern):
    with pytest.raises((ValueError, TypeError)) as info:
        run_request(req, cache)
    assert info.match(pattern)


def test_words_not_in_the_prompt_are_refused(cache):
    with cache.use("tiny-sd") as pipe:
        runner.check_words(pipe, PROMPT, "tokens", "x", ["car", "white sheep", "a#2", 3])
        runner.check_words(pipe, PROMPT, "groups", "x", "red car;white sheep")
        with pytest.raises(ControlArgError, match="giraffe"):
            runner.check_words(pipe, PROMPT, "tokens", "x", ["car", "giraffe"])


# --------------------------------------------------------------------------------------- cache


def test_model_cache_loads_once_evicts_lru_and_forgets_failures():
    loads = []

    def loader(key):
        loads.append(key)
        if key == "broken":
            raise ModelLoadError("cannot load broken")
        return object()

    cache = ModelCache(2, loader=loader)
    with cache.use("A") as a1:
        pass
    with cache.use(" A ") as a2:
        assert a2 is a1
    with cache.use("B"), cache.use("C"):
        pass
    assert cache.loaded() == ["B", "C"] and loads == ["A", "B", "C"]
    for _ in range(2):
        with pytest.raises(ModelLoadError), cache.use("broken"):
            pass
    assert loads.count("broken") == 2 and "broken" not in cache.loaded()  # a failure is not cached
    with cache.use("tiny-SD"):
        pass
    assert cache.loaded()[-1] == "tiny-sd"  # embedded names are case-insensitive


def test_runs_on_one_model_take_turns_and_different_models_overlap():
    cache = ModelCache(4, loader=lambda key: key)
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    both = []
    lock = threading.Lock()

    def work(model):
        with cache.use(model):
            with lock:
                active[model] = active.get(model, 0) + 1
                peak[model] = max(peak.get(model, 0), active[model])
                both.append(sum(active.values()))
            time.sleep(0.05)
            with lock:
                active[model] -= 1

    threads = [threading.Thread(target=work, args=(m,)) for m in ["x", "x", "x", "y", "y", "y"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == {"x": 1, "y": 1}  # never two runs on the same pipeline at once
    assert max(both) == 2  # but x and y ran at the same time


# ------------------------------------------------------------------------------------ command


def test_app_subcommand_options(capsys):
    args = build_parser().parse_args(["app"])
    assert (args.model, args.host, args.port, args.share, args.concurrency) == (None, "127.0.0.1", 7860, False, 2)
    args = build_parser().parse_args(["app", "--model", "tiny-sdxl", "--host", "0.0.0.0", "--port", "8000", "--share"])
    assert (args.model, args.host, args.port, args.share) == ("tiny-sdxl", "0.0.0.0", 8000, True)
    assert build_parser().parse_args(["app", "--no-share"]).share is False
    assert main(["app", "--port", "0"]) == 2 and "positive integer" in capsys.readouterr().err
    assert main(["app", "--help"]) == 0 and "--no-share" in capsys.readouterr().out


def test_default_model_follows_the_library(monkeypatch):
    from attnctrl.models import loading

    monkeypatch.setattr(loading, "DEFAULT_MODEL", "tiny-sdxl")
    assert runner.model_key(None) == runner.model_key("  ") == "tiny-sdxl"
    assert parse_control("maps", []).layers == "cross"


def test_a_local_folder_loads_once_and_runs_like_the_embedded_model(tmp_path):
    from attnctrl.models.tiny import build_tiny

    build_tiny("tiny-sd").save_pretrained(tmp_path / "my-model")
    cache = ModelCache(1)
    req = Request(PROMPT, model=str(tmp_path / "my-model"), seed=2, steps=2, compare=False)
    first, second = run_request(req, cache), run_request(req, cache)
    assert cache.loads == 1 and cache.loaded() == [str(tmp_path / "my-model")]
    assert (
        first.latent_hash
        == second.latent_hash
        == run_request(Request(PROMPT, model="tiny-sd", seed=2, steps=2), ModelCache(1)).latent_hash
    )
    assert shlex.split(first.cli)[shlex.split(first.cli).index("--model") + 1] == str(tmp_path / "my-model")
