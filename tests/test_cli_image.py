"""``attnctrl generate --image / --mask / --strength``: img2img and inpainting equal stock; bad files refused."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image
from test_pipeline_kinds import init_image, mask_image

from attnctrl.cli import main

PROMPT = "a red car and a white sheep"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def files(tmp_path):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init_image().save(init)
    mask_image().save(mask)
    return init, mask


@pytest.mark.parametrize("inpaint", [False, True])
def test_image_and_mask_run_the_kind_and_equal_stock(tiny, capsys, files, tmp_path, inpaint):
    init, mask = files
    out = tmp_path / "out.png"
    argv = ["generate", PROMPT, "-m", "tiny-sd", "--image", init, "--strength", "0.6", "--steps", "3", "--seed", "1"]
    rc, _, err = run(capsys, *argv, *(["--mask", mask] if inpaint else []), "-o", out)
    assert rc == 0, err
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
    stock = cls.from_pipe(tiny("tiny-sd"))
    stock.set_progress_bar_config(disable=True)
    extra = {"mask_image": Image.open(mask).convert("RGB")} if inpaint else {}
    ref = stock(
        PROMPT,
        image=Image.open(init).convert("RGB"),
        strength=0.6,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(1),
        **extra,
    ).images[0]
    assert np.array_equal(pixels(out), np.asarray(ref))
    with Image.open(out) as im:
        params = json.loads(im.text["attnctrl"])
    assert params["image"] == str(init) and params["strength"] == 0.6
    assert (params["mask"] == str(mask)) if inpaint else params["mask"] is None
    again = tmp_path / "again.png"  # the recorded command regenerates the image
    rc, _, err = run(capsys, *shlex.split(params["command"])[1:], "-o", again)
    assert rc == 0, err
    assert np.array_equal(pixels(again), pixels(out))


@pytest.mark.parametrize("case", ["missing", "not-an-image", "mask-alone", "strength"])
def test_bad_image_arguments_exit_2_with_one_line_and_write_nothing(capsys, files, tmp_path, case):
    init, mask = files
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    args = {
        "missing": ["--image", tmp_path / "nope.png"],
        "not-an-image": ["--image", init, "--mask", bad],
        "mask-alone": ["--mask", mask],
        "strength": ["--image", init, "--strength", "1.5"],
    }[case]
    out = tmp_path / "out.png"
    rc, stdout, err = run(capsys, "generate", PROMPT, "-m", "tiny-sd", "--steps", "2", *args, "-o", out)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnctrl: error:")
    expected = {"missing": "init image", "not-an-image": "mask", "mask-alone": "--image", "strength": "--strength"}
    assert expected[case] in lines[0]
    assert not out.exists() and stdout == ""
