"""The JOBS.jsonl file of ``attnctrl batch``: each line a JSON object turned into ``generate``'s
arguments and parsed by ``generate``'s own parser, so a job takes exactly what ``generate`` takes.

    {"prompt": "a cat and a frog", "seed": 3, "steps": 20, "controls": ["attend-excite tokens=cat,frog"]}
    {"prompt": ["a red car", "a white sheep"], "seed": 4, "model": "tiny-sd", "maps": true}

``prompt`` is a text or a list of texts (one batch), ``seed`` an integer (required: a job's images
depend on nothing else), ``controls`` a list of ``--control`` strings (``"NAME key=value ..."``,
shell-quoted), every other key a ``generate`` option by its long name (``num-images`` or
``num_images``); flags take ``true``/``false``. Blank lines are skipped; the jobs are numbered from
0 in file order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import CLIError, Parser, UsageError, one_line

__all__ = ["Job", "read_jobs", "generate_parser"]

#: generate options a job does not take: the batch names its outputs; the prompt and controls are keys
_NOT_KEYS = {"prompts", "output", "maps_out", "control", "help", "prompt"}


@dataclass
class Job:
    index: int  # 0-based, in file order (blank lines skipped)
    line: int  # 1-based line of JOBS.jsonl
    prompts: list[str]
    seed: int
    args: argparse.Namespace  # generate's parsed options; prompt(s) and output are set when it runs
    key: str  # hash of the job's settings: a manifest entry counts only for the same job


def generate_parser() -> argparse.ArgumentParser:
    """``generate``'s own argument parser."""
    from attnctrl.models.tiny import TINY_MODELS

    from .generate import add_generate_parser

    top = Parser(prog="attnctrl")
    sub = top.add_subparsers(dest="command", parser_class=Parser)
    add_generate_parser(sub, f"an embedded model ({', '.join(TINY_MODELS)}), a local diffusers folder or a hub id")
    return sub.choices["generate"]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Job key (dest, and the long name without dashes) → the option's action."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if not longs or action.dest in _NOT_KEYS:
            continue
        keys[action.dest] = keys[longs[0][2:]] = action
    return keys


def _prompts(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise CLIError("prompt must be a text or a non-empty list of texts")
    for t in texts:
        if not t.strip():
            raise CLIError("the prompt is empty: give a text prompt describing the image")
        if len(texts) > 1 and ("\n" in t or "\r" in t):
            raise CLIError("a prompt in a list must be one line")
    return texts


def _controls(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise CLIError('controls must be a list of --control strings, e.g. ["maps", "attend-excite tokens=cat"]')
    argv = []
    for c in value:
        try:
            argv += ["--control", *shlex.split(c)]
        except ValueError as err:
            raise CLIError(f"control {c!r}: {err}") from None
    return argv


def _job_argv(obj: dict[str, Any], options: dict[str, argparse.Action]) -> tuple[list[str], list[str], int]:
    """A job object → (prompts, generate's options as argv, seed)."""
    unknown = sorted(set(obj) - {"prompt", "seed", "controls"} - set(options))
    if unknown:
        raise CLIError(f"unknown key {unknown[0]!r} (keys: prompt, seed, controls, {', '.join(sorted(options))})")
    if "prompt" not in obj:
        raise CLIError("give a prompt")
    seed = obj.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CLIError("give a seed: an integer (a job's images depend only on its seed and settings)")
    argv = ["--seed", str(seed)]
    for key, value in obj.items():
        if key in ("prompt", "seed", "controls"):
            continue
        action, flag = options[key], options[key].option_strings[-1]
        if action.nargs == 0:  # a flag: true or false
            if not isinstance(value, bool):
                raise CLIError(f"{key} is a flag: give true or false, not {json.dumps(value)}")
            argv += [flag] if value else []
        elif isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise CLIError(f"{key} must be a text or a number, not {json.dumps(value)}")
        else:
            argv += [flag, str(value)]
    if "controls" in obj:
        argv += _controls(obj["controls"])
    return _prompts(obj["prompt"]), argv, seed


def _check_controls(args: argparse.Namespace) -> None:
    """Each control parses (name, keys, values) as ``generate`` will parse it."""
    from attnctrl.controls.registry import parse_control

    for name, items in args.control:
        parse_control(name.strip().lower(), items)


def read_jobs(path: str | Path) -> list[Job]:
    """Every job of a JOBS.jsonl file, all checked before any runs; a bad line raises `CLIError`
    naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"jobs file {str(p)!r} does not exist" if not p.exists() else f"{str(p)!r} is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CLIError(f"jobs file {str(p)!r} is not UTF-8 text") from None
    parser = generate_parser()
    jobs: list[Job] = []
    options = _options(parser)
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise CLIError(f"not JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(obj, dict):
                raise CLIError("a job is a JSON object {...}")
            prompts, argv, seed = _job_argv(obj, options)
            args = parser.parse_args(argv)
            _check_controls(args)
        except (CLIError, UsageError, ValueError) as err:
            raise CLIError(f"{p} line {number}: {one_line(err)}") from None
        key = hashlib.sha256(json.dumps([prompts, argv]).encode("utf-8")).hexdigest()[:16]
        jobs.append(Job(len(jobs), number, prompts, seed, args, key))
    if not jobs:
        raise CLIError(f"jobs file {str(p)!r} has no jobs: write one JSON object per line")
    return jobs
