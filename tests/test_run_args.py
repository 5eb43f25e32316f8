"""Every argument of a run is checked against the loaded model before any work (`attnctrl.run_args`),
with one message per refusal shared by the Python API, the CLI and the app."""

from __future__ import annotations

import math
import warnings

import pytest

import attnctrl as ac
from attnctrl.pipelines import ControlledPipeline
from attnctrl.run_args import ModelFacts, RunArgError, VocabularyWarning, check_run, nearest_sizes, out_of_vocabulary
from conftest import processors_of

FACTS = ModelFacts(
    family="sd",
    scheduler="DDIMScheduler",
    num_train_timesteps=1000,
    size_multiple=8,
    size_reason="the VAE's scale factor 8",
    default_size=(512, 512),
    clip_layers=12,
)


def kw(**extra):
    return {"prompt": "a cat", "num_inference_steps": 50, "num_images_per_prompt": 1, **extra}


# ---------------------------------------------------------------------------- the rules, by hand


def test_nearest_sizes_are_the_multiples_either_side():
    assert nearest_sizes(500, 8) == [496, 504]
    assert nearest_sizes(512, 8) == [512]
    assert nearest_sizes(3, 8) == nearest_sizes(-64, 8) == [8]
    assert nearest_sizes(13.5, 16) == [16]
    assert nearest_sizes(1000, 16, max_size=1536) == [992, 1008]
    assert nearest_sizes(1530, 16, max_size=1536) == [1520, 1536]
    assert nearest_sizes(4096, 16, max_size=1536) == [1536]


def test_steps_bound_is_the_schedulers_num_train_timesteps():
    check_run(kw(num_inference_steps=1), FACTS)
    check_run(kw(num_inference_steps=1000), FACTS)  # the last valid count
    with pytest.raises(RunArgError) as err:
        check_run(kw(num_inference_steps=1001), FACTS)
    assert str(err.value) == (
        "num_inference_steps must be a positive integer from 1 to 1000 (the DDIMScheduler has "
        "num_train_timesteps=1000), got 1001: pass at most 1000"
    )
    assert err.value.argument == "num_inference_steps"
    small = ModelFacts(**{**FACTS.__dict__, "num_train_timesteps": 20, "scheduler": "LCMScheduler"})
    check_run(kw(num_inference_steps=20), small)
    with pytest.raises(RunArgError, match=r"from 1 to 20 \(the LCMScheduler has num_train_timesteps=20\), got 21"):
        check_run(kw(num_inference_steps=21), small)


def test_custom_timesteps_replace_the_step_count_and_are_checked_instead():
    check_run(kw(num_inference_steps=None, timesteps=[999, 500, 1]), FACTS)
    with pytest.raises(RunArgError, match=r"sigmas must be a non-empty list of finite numbers, got \[1.0, nan\]"):
        check_run(kw(sigmas=[1.0, math.nan]), FACTS)
    with pytest.raises(RunArgError, match="timesteps has 1001 entries; the DDIMScheduler allows at most 1000"):
        check_run(kw(timesteps=list(range(1001))), FACTS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive integer from 1 to 1000"),
        ({"num_inference_steps": 2.5}, "got 2.5: pass a whole number of steps, e.g. 50"),
        ({"num_inference_steps": True}, "got True: pass a whole number of steps"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be a positive integer (1 or more), got 0"),
        ({"num_images_per_prompt": 2.0}, "num_images_per_prompt must be a positive integer (1 or more), got 2.0"),
        (
            {"height": 500},
            "height must be a multiple of 8 pixels for this model (the VAE's scale factor 8), got 500: "
            "use 496 or 504 (the model's default is 512)",
        ),
        (
            {"width": 0},
            "width must be a positive integer number of pixels, a multiple of 8 (the VAE's scale factor 8), ",
        ),
        ({"width": 13.5}, "got 13.5: use 8 or 16"),
        ({"height": -64}, "got -64: use 8"),
        ({"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0, got nan: pass e.g. 7.5"),
        ({"guidance_scale": math.inf}, "guidance_scale must be a finite number >= 0, got inf"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": "7"}, "guidance_scale must be a finite number >= 0, got '7'"),
        ({"guidance_rescale": 1.5}, "guidance_rescale must be a finite number from 0 to 1, got 1.5"),
        ({"eta": -0.1}, "eta must be a finite number from 0 to 1, got -0.1"),
        ({"true_cfg_scale": math.inf}, "true_cfg_scale must be a finite number >= 0, got inf"),
        ({"skip_layer_guidance_stop": 2}, "skip_layer_guidance_stop must be a finite number from 0 to 1, got 2"),
        ({"mu": math.nan}, "mu must be a finite number, got nan"),
        ({"clip_skip": 12}, "clip_skip must be an integer from 0 to 11 (the CLIP text encoder has 12 layers), got 12"),
    ],
)
def test_each_refused_number_names_argument_value_range_and_remedy(extra, message):
    with pytest.raises(RunArgError) as err:
        check_run(kw(**extra), FACTS)
    assert message in str(err.value)
    assert err.value.argument == next(iter(extra))


def test_sizes_at_the_models_limit():
    sd3 = ModelFacts(**{**FACTS.__dict__, "family": "sd3", "size_multiple": 16, "max_size": 1536})
    check_run(kw(height=1536, width=16), sd3)
    with pytest.raises(RunArgError, match=r"height must be at most 1536 pixels for this model .*got 1552: use 1536"):
        check_run(kw(height=1552), sd3)
    with pytest.raises(RunArgError, match=r"max_sequence_length must be an integer from 1 to 512"):
        check_run(kw(max_sequence_length=513), sd3)
    check_run(kw(max_sequence_length=512), sd3)


def test_words_outside_a_closed_vocabulary_are_named():
    vocab = frozenset({"a", "red", "circle", "and", "blue", "square", ","})
    assert out_of_vocabulary(["a red dog, and a Cat", "a dog"], vocab) == ["dog", "Cat"]
    assert out_of_vocabulary(["anything at all"], None) == []
    closed = ModelFacts(**{**FACTS.__dict__, "vocabulary": vocab})
    notes = check_run(kw(prompt="a red dog", negative_prompt="a blurry circle"), closed)
    assert notes == [
        "not in this model's vocabulary: dog, blurry (the model never saw them; it knows: "
        "a, and, blue, circle, red, square)"
    ]
    assert check_run(kw(prompt="a red circle"), closed) == []


# ----------------------------------------------------------------------- through the Python API


@pytest.fixture
def pipes(tiny):
    return {name: ControlledPipeline(tiny(name)) for name in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")}


def test_model_facts_of_each_family(pipes):
    sd, sdxl, sd3, flux = (pipes[n].model_facts() for n in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"))
    # the tiny VAEs have two blocks: scale factor 2; SD3 patches 2x2, FLUX packs 2x2
    assert (sd.size_multiple, sdxl.size_multiple, sd3.size_multiple, flux.size_multiple) == (2, 2, 4, 4)
    assert sd.scheduler == "DDIMScheduler" and sdxl.scheduler == "EulerDiscreteScheduler"
    assert sd3.scheduler == flux.scheduler == "FlowMatchEulerDiscreteScheduler"
    assert {f.num_train_timesteps for f in (sd, sdxl, sd3, flux)} == {1000}
    assert sd3.max_size == 96 * 2 * 2 and sd.max_size is None  # pos_embed_max_size x patch x VAE
    assert sd.default_size == sd3.default_size == (64, 64)
    assert sd.vocabulary is None


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("tiny-sdxl", {"num_inference_steps": 1001}, "EulerDiscreteScheduler has num_train_timesteps=1000), got 1001"),
        ("tiny-sd3", {"num_inference_steps": 1001}, "FlowMatchEulerDiscreteScheduler has num_train_timesteps=1000"),
        ("tiny-sd", {"num_inference_steps": 1001}, "DDIMScheduler has num_train_timesteps=1000), got 1001"),
        ("tiny-sd", {"height": 63}, "height must be a multiple of 2 pixels for this model (the VAE's scale factor 2)"),
        (
            "tiny-sd3",
            {"height": 66},
            "multiple of 4 pixels for this model (VAE scale factor 2 x patch size 2), got 66: use 64 or 68",
        ),
        (
            "tiny-flux",
            {"width": 66},
            "multiple of 4 pixels for this model (VAE scale factor 2 x FLUX's 2x2 latent packing)",
        ),
        ("tiny-sd3", {"height": 4096}, "height must be at most 384 pixels for this model"),
        ("tiny-sd", {"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0, got nan"),
        ("tiny-sd", {"guidance_rescale": 5.0}, "guidance_rescale must be a finite number from 0 to 1, got 5.0"),
        ("tiny-sd", {"eta": 2.0}, "eta must be a finite number from 0 to 1, got 2.0"),
        ("tiny-flux", {"true_cfg_scale": math.inf}, "true_cfg_scale must be a finite number >= 0, got inf"),
        ("tiny-sd3", {"max_sequence_length": 1000}, "max_sequence_length must be an integer from 1 to 512"),
        ("tiny-sd", {"clip_skip": 50}, "clip_skip must be an integer from 0 to 2 (the CLIP text encoder has 3 layers)"),
        ("tiny-sd", {"num_images_per_prompt": True}, "num_images_per_prompt must be a positive integer"),
        ("tiny-sd", {"seed": -1}, "seed must be an integer from 0 to 2**63-1, got -1"),
        ("tiny-sd", {"seed": True}, "seed must be an integer from 0 to 2**63-1, got True"),
        ("tiny-sd", {"seed": 2**63}, "seed must be an integer from 0 to 2**63-1, got 9223372036854775808"),
    ],
)
def test_the_api_refuses_before_any_work(pipes, monkeypatch, name, extra, message):
    pipe = pipes[name]
    extra = {"num_inference_steps": 2, "seed": 0, **extra}
    before = processors_of(pipe.pipe)

    def no_work(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(pipe.adapter, "prepare", no_work)
    monkeypatch.setattr(pipe.pipe, "encode_prompt", no_work)
    with pytest.raises(RunArgError) as err:
        pipe("a red car", **extra)
    assert message in str(err.value)
    with pytest.raises(RunArgError) as checked:  # the same check, without a run
        pipe.check_call("a red car", **extra)
    assert str(checked.value) == str(err.value)
    assert all(processors_of(pipe.pipe)[k] is v for k, v in before.items())


def test_valid_edges_are_accepted_without_running(pipes):
    assert pipes["tiny-sdxl"].check_call("a red car", seed=2**63 - 1, num_inference_steps=1000) == []
    assert pipes["tiny-sd3"].check_call("a red car", height=384, width=4, max_sequence_length=512) == []
    assert pipes["tiny-sd"].check_call("a red car", seed=0, clip_skip=2, eta=1.0, guidance_rescale=1.0) == []


def test_the_shapes_model_warns_about_words_it_does_not_know():
    pipe = ac.load("shapes")
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red dog left of a blue circle"
    assert pipe.model_facts().vocabulary is not None
    assert pipe.check_call("a red square left of a blue circle") == []
    with pytest.warns(VocabularyWarning, match=r"not in this model's vocabulary: dog \(the model never saw them"):
        out = pipe(prompt, seed=0, num_inference_steps=1, output_type="latent")
    assert out.latents.shape == (1, 4, 16, 16)  # a warning, not a refusal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a red square", seed=0, num_inference_steps=1, output_type="latent")


# ------------------------------------------------------------------------------ through the CLI

CLI_REFUSED = {
    "steps over the scheduler's range": (
        ["--steps", "1001"],
        "attnctrl: error: --steps: num_inference_steps must be a positive integer from 1 to 1000 (the "
        "DDIMScheduler has num_train_timesteps=1000), got 1001: pass at most 1000",
    ),
    "height the VAE cannot make": (
        ["--height", "63"],
        "attnctrl: error: --height: height must be a multiple of 2 pixels for this model (the VAE's scale "
        "factor 2), got 63: use 62 or 64 (the model's default is 64)",
    ),
    "width the VAE cannot make": (["--width", "65"], "attnctrl: error: --width: width must be a multiple of 2"),
    "guidance nan": (
        ["--guidance", "nan"],
        "attnctrl: error: --guidance: guidance_scale must be a finite number >= 0, got nan: pass e.g. 7.5",
    ),
    "guidance inf": (["--guidance", "inf"], "attnctrl: error: --guidance: guidance_scale must be a finite number"),
    "negative guidance": (
        ["--guidance", "-1"],
        "attnctrl: error: --guidance: guidance_scale must be a finite number >= 0, got -1.0",
    ),
    "negative seed": (["--seed", "-1"], "attnctrl: error: argument --seed: must be between 0 and 2**63-1"),
    "zero steps": (["--steps", "0"], "attnctrl: error: argument --steps: must be a positive integer"),
}


@pytest.mark.parametrize("case", list(CLI_REFUSED))
def test_the_cli_refuses_with_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    from attnctrl.cli import main

    monkeypatch.chdir(tmp_path)
    flags, message = CLI_REFUSED[case]
    rc = main(["generate", "a red car", "--model", "tiny-sd", *flags, "-o", str(tmp_path / "x.png")])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and cap.out == ""
    assert len(lines) == 1 and lines[0].startswith(message), cap.err
    assert list(tmp_path.iterdir()) == []  # no image, no temp file


def test_the_cli_names_unknown_words_of_the_shapes_model_in_one_warning_line(tmp_path, capsys):
    from attnctrl.cli import main

    out = tmp_path / "dog.png"
    rc = main(["generate", "a red dog left of a blue circle", "--seed", "0", "--steps", "1", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and out.is_file()
    warned = [line for line in err.splitlines() if line.startswith("attnctrl: warning: ")]
    assert warned == [
        "attnctrl: warning: not in this model's vocabulary: dog (the model never saw them; it knows: a, above, an, "
        "and, below, blue, circle, green, large, left, of, purple, red, right, small, square, the, to, triangle, yellow)"
    ]
