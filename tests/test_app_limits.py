"""The web app's request checks: the server's resource limits (``attnctrl app --max-steps
--max-pixels --max-images``) and the model's own argument checks, all before any run; a run that
fails (out of memory included) is reported and the server goes on serving. The load test drives a
real server over loopback HTTP with the Gradio client."""

from __future__ import annotations

import json
import math
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import attnctrl as ac
from attnctrl.app.runner import Limits, ModelCache, OutOfMemory, Request, latent_hash, run_request
from attnctrl.cli import build_parser, main
from attnctrl.cli.app import pixel_count
from conftest import processors_of

PROMPT = "a red car"


class Counting:
    """A model loader that counts loads and calls of the denoising preparation (= runs started)."""

    def __init__(self):
        self.loads, self.runs, self.pipes = 0, 0, {}

    def __call__(self, key):
        self.loads += 1
        pipe = ac.load(key)
        pipe.set_progress_bar_config(disable=True)
        prepare = pipe.adapter.prepare

        def counted(*a, **k):
            self.runs += 1
            return prepare(*a, **k)

        pipe.adapter.prepare = counted
        self.pipes[key] = pipe
        return pipe


@pytest.fixture
def counting():
    loader = Counting()
    return loader, ModelCache(2, loader=loader)


# ----------------------------------------------------------------------------- server limits


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (
            Request(PROMPT, model="tiny-sd", steps=101),
            "steps: at most 100 per run on this server (attnctrl app --max-steps), got 101: ask for fewer steps",
        ),
        (
            Request(PROMPT, model="tiny-sd", num_images=5),
            "images: at most 4 per run on this server (attnctrl app --max-images), got 5: ask for fewer images",
        ),
        (
            Request(PROMPT, model="tiny-sd", height=2048, width=1024),
            "image size 1024x2048 = 2097152 pixels is over this server's limit of 1048576 pixels per image "
            "(attnctrl app --max-pixels): ask for a smaller image, e.g. 1024x1024 or less",
        ),
    ],
)
def test_default_limits_refuse_before_the_model_is_loaded(counting, req, message):
    loader, cache = counting
    with pytest.raises(ValueError) as err:
        run_request(req, cache)
    assert str(err.value) == message
    assert loader.loads == loader.runs == 0


def test_limits_at_their_edge_and_at_the_models_default_size(counting):
    loader, cache = counting
    edge = Limits(max_steps=2, max_pixels=64 * 64, max_images=2)
    res = run_request(Request(PROMPT, model="tiny-sd", steps=2, num_images=2, height=64, width=64), cache, limits=edge)
    assert len(res.images) == 2 and res.size == (64, 64)
    runs = loader.runs
    with pytest.raises(ValueError, match=r"image size 64x64 = 4096 pixels is over this server's limit of 4095"):
        run_request(Request(PROMPT, model="tiny-sd", steps=2), cache, limits=Limits(max_pixels=64 * 64 - 1))
    assert loader.runs == runs  # the default size was checked, nothing ran


def test_limits_themselves_must_be_positive_integers():
    with pytest.raises(ValueError, match="max_steps must be a positive integer, got 0"):
        Limits(max_steps=0)
    with pytest.raises(ValueError, match="max_images must be a positive integer, got 1.5"):
        Limits(max_images=1.5)  # type: ignore[arg-type]


def test_app_command_passes_its_limits_to_the_server(monkeypatch, capsys):
    args = build_parser().parse_args(["app"])
    assert (args.max_steps, args.max_pixels, args.max_images) == (100, 1024 * 1024, 4)
    assert pixel_count("1024x1024") == pixel_count("1048576") == 1024 * 1024 and pixel_count("64X32") == 2048
    seen = {}
    monkeypatch.setattr("attnctrl.app.launch", lambda *a, **k: seen.update(k))
    assert main(["app", "--max-steps", "10", "--max-pixels", "64x64", "--max-images", "2"]) == 0
    assert seen["limits"] == Limits(max_steps=10, max_pixels=4096, max_images=2)
    for bad in (["--max-pixels", "0x64"], ["--max-pixels", "big"], ["--max-steps", "0"], ["--max-images", "-1"]):
        assert main(["app", *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"attnctrl: error: argument {bad[0]}: ") and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ model checks


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (
            Request(PROMPT, model="tiny-sd", steps=1001),
            "steps: num_inference_steps must be a positive integer from 1 to 1000 (the DDIMScheduler has "
            "num_train_timesteps=1000), got 1001: pass at most 1000",
        ),
        (
            Request(PROMPT, model="tiny-sd", height=63),
            "height: height must be a multiple of 2 pixels for this model (the VAE's scale factor 2), got 63: "
            "use 62 or 64 (the model's default is 64)",
        ),
        (
            Request(PROMPT, model="tiny-sd3", width=66),
            "width: width must be a multiple of 4 pixels for this model (VAE scale factor 2 x patch size 2), "
            "got 66: use 64 or 68 (the model's default is 64)",
        ),
        (
            Request(PROMPT, model="tiny-sd", guidance=math.nan),
            "guidance scale: guidance_scale must be a finite number >= 0, got nan: pass e.g. 7.5",
        ),
        (Request(PROMPT, model="tiny-sd", guidance=-2), "guidance scale: guidance_scale must be a finite number >= 0"),
    ],
)
def test_the_models_checks_name_the_pages_field_before_any_run(counting, req, message):
    loader, cache = counting
    with pytest.raises(ValueError) as err:
        run_request(req, cache, limits=Limits(max_steps=5000))
    assert str(err.value).startswith(message)
    assert loader.runs == 0


def test_words_outside_the_shapes_vocabulary_are_noted_in_the_result(counting):
    _, cache = counting
    res = run_request(Request("a red dog left of a blue circle", model="shapes", steps=1), cache)
    assert res.note.startswith("not in this model's vocabulary: dog (the model never saw them; it knows: a, above")
    assert not run_request(Request("a red square", model="shapes", steps=1, compare=False), cache).note


def test_out_of_memory_is_reported_and_the_model_keeps_serving(counting):
    loader, cache = counting
    good = Request(PROMPT, model="tiny-sd", steps=2, seed=3)
    expected = run_request(good, cache).latent_hash
    pipe = loader.pipes["tiny-sd"]
    before = processors_of(pipe.pipe)
    denoiser_forward = pipe.pipe.unet.forward

    def exhausted(*a, **k):
        raise MemoryError()

    pipe.pipe.unet.forward = exhausted  # the first denoising step runs out of memory
    try:
        with pytest.raises(OutOfMemory) as err:
            run_request(Request(PROMPT, model="tiny-sd", steps=2, height=64, width=64), cache)
    finally:
        pipe.pipe.unet.forward = denoiser_forward
    assert str(err.value) == (
        "out of memory in this run (MemoryError; size 64x64, 1 image(s), 2 steps): ask for a smaller size or "
        "fewer images, then generate again"
    )
    assert all(processors_of(pipe.pipe)[k] is v for k, v in before.items())  # stock processors back
    assert run_request(good, cache).latent_hash == expected  # the same model, lock free, same result
    assert loader.loads == 1


# ---------------------------------------------------------------------------------- load test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOAD_REQUESTS = 30
LOAD_CONCURRENCY = 6


def _load_plan() -> list[tuple[dict, str | None]]:
    """(form values, expected error) for each request: good ones with different seeds, and bad ones."""
    bad = [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 11}, "steps: at most 10 per run on this server"),
        ({"images": 3}, "images: at most 2 per run on this server"),
        ({"height (px, 0 = default)": 63}, "height: height must be a multiple of 2 pixels"),
        ({"height (px, 0 = default)": 128, "width (px, 0 = default)": 128}, "over this server's limit of 4096"),
        ({"guidance scale": -1}, "guidance scale: guidance_scale must be a finite number >= 0"),
        ({"prompt": "  "}, "the prompt is empty"),
        ({"prompt": "out of memory"}, "out of memory in this run (MemoryError"),
    ]
    plan: list[tuple[dict, str | None]] = []
    for i in range(LOAD_REQUESTS):
        if i % 3 == 2:
            plan.append(bad[(i // 3) % len(bad)])
        else:
            plan.append(({"seed": i, "prompt": f"a red car number {i}"}, None))
    return plan


@pytest.mark.slow
def test_load_many_concurrent_requests_over_http(monkeypatch):
    """30 requests, 6 at a time, a third of them bad (over the limits, refused by the model, one out
    of memory): every good one gets the image the Python API makes, every bad one its message, and
    the server answers afterwards. Prints the figures (pytest -s to see them)."""
    from gradio_client import Client

    from attnctrl.app import launch
    from attnctrl.pipelines import ControlledPipeline

    real_call = ControlledPipeline.__call__

    def call(self, prompt=None, **kw):  # a run that exhausts memory, on request
        if prompt == "out of memory":
            raise MemoryError()
        return real_call(self, prompt, **kw)

    monkeypatch.setattr(ControlledPipeline, "__call__", call)
    port = _free_port()
    limits = Limits(max_steps=10, max_pixels=64 * 64, max_images=2)
    demo = launch("tiny-sd", port=port, concurrency=2, limits=limits, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/on_generate"]
        by_label = {p["label"]: p["parameter_name"] for p in api["parameters"]}
        untouched = {p["parameter_name"]: p.get("parameter_default") for p in api["parameters"]}  # the page's

        def ask(values: dict):
            form = {"steps": 2, "also run without controls (same seed), side by side": False, **values}
            given = {by_label[k]: v for k, v in form.items()}
            return client.predict(**{**untouched, **given}, api_name="/on_generate")

        plan = _load_plan()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            answers = list(pool.map(lambda item: ask(item[0]), plan))
        seconds = time.perf_counter() - t0

        pipe = ac.load("tiny-sd")
        pipe.set_progress_bar_config(disable=True)
        good = 0
        for (values, expected), answer in zip(plan, answers):
            status = answer[0]
            if expected is None:
                assert re.match(r"Run \d+ · Done in", status), status
                info = json.loads(answer[-3])
                want = real_call(pipe, values["prompt"], seed=values["seed"], num_inference_steps=2, controls=[])
                assert info["latent_hash"] == latent_hash(want.latents) and info["size"] == "64x64"
                good += 1
            else:
                assert re.match(r"Run \d+ · .*Error", status) and expected in status, (expected, status)
        after = ask({"seed": 99, "prompt": "a white sheep"})[0]  # still serving
        assert after.startswith("Run ") and "Done in" in after
        print(
            f"\nload test: {len(plan)} requests ({good} good, {len(plan) - good} bad), {LOAD_CONCURRENCY} at a time "
            f"(queue concurrency 2): {len(answers)} answered in {seconds:.1f} s; the server answered afterwards"
        )
        assert good == 20 and len(answers) == LOAD_REQUESTS
    finally:
        demo.close()
