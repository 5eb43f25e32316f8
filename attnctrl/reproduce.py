"""The ``attnctrl generate`` command line that regenerates a run: one home for the CLI's PNG
metadata and the web app's "reproduce" box."""

from __future__ import annotations

from typing import Any

#: The command's name.
PROG = "attnctrl"


def reproduce_argv(params: dict[str, Any]) -> list[str]:
    """``attnctrl generate`` arguments (without the program name) that regenerate a run.

    `params` holds prompt (or prompts_file), model, seed, steps, guidance, height, width and
    optionally negative_prompt, num_images, reference_image, reference_prompt, image, mask, strength,
    and controls as
    ``[{"name": ..., "args": {key: value}}]`` — the ``attnctrl`` PNG metadata the CLI writes."""
    head = ["--prompts", params["prompts_file"]] if params.get("prompts_file") else [params["prompt"]]
    argv = [
        "generate",
        *head,
        "--model",
        params["model"],
        "--seed",
        str(params["seed"]),
        "--steps",
        str(params["steps"]),
        "--guidance",
        repr(float(params["guidance"])),
        "--height",
        str(params["height"]),
        "--width",
        str(params["width"]),
    ]
    if params.get("negative_prompt") is not None:
        argv += ["--negative", params["negative_prompt"]]
    if params.get("num_images", 1) != 1:
        argv += ["--num-images", str(params["num_images"])]
    for key in ("reference_image", "reference_prompt", "image", "mask"):
        if params.get(key) is not None:
            argv += ["--" + key.replace("_", "-"), params[key]]
    if params.get("strength") is not None:
        argv += ["--strength", repr(float(params["strength"]))]
    for c in params.get("controls", []):
        argv += ["--control", c["name"], *(f"{k}={v}" for k, v in c["args"].items())]
    return argv
