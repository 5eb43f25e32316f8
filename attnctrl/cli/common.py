"""What every ``attnctrl`` subcommand shares: the error types, argument types, model loading and
output files that appear only when everything was written."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

from attnctrl.reproduce import PROG

__all__ = [
    "PROG",
    "CLIError",
    "UsageError",
    "Parser",
    "Outputs",
    "positive_int",
    "positive_float",
    "seed_int",
    "float_arg",
    "load_model",
    "check_prompt",
    "read_prompts",
    "one_line",
    "table",
    "DropTorchvisionNotice",
]


class CLIError(ValueError):
    """Bad command-line input found by the CLI itself."""


class UsageError(Exception):
    """An argparse error, reported as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------- arguments


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def seed_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63-1, got {text!r}")
    return v


def float_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    v = float_arg(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


# ------------------------------------------------------------------------------------ helpers


class DropTorchvisionNotice(logging.Filter):
    """transformers' 'requires torchvision, falling back to the PIL processor' notice is not actionable here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def load_model(model: str | None):
    """`ac.load` of a --model value (None: the embedded default)."""
    import attnctrl as ac
    from attnctrl.models.loading import model_key

    return ac.load(model_key(model))


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise CLIError("the prompt is empty: give a text prompt describing the image")


def read_prompts(path: str | Path) -> list[str]:
    """The non-blank lines of a UTF-8 prompts file, one prompt each."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"prompts file {str(p)!r} does not exist")
    if not p.is_file():
        raise CLIError(f"prompts file {str(p)!r} is not a file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CLIError(f"prompts file {str(p)!r} is not UTF-8 text") from None
    except OSError as err:
        raise CLIError(f"cannot read prompts file {str(p)!r}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"prompts file {str(p)!r} has no prompts: write one prompt per line")
    return prompts


def one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def table(header: Sequence[object], rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> list[str]:
    """A plain-text table: header, a rule, the rows (cells written with `str`); columns in `right` right-aligned."""
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]

    def fmt(r):
        cells = [str(c).rjust(w) if j in right else str(c).ljust(w) for j, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


# ----------------------------------------------------------------------------------- outputs


class Outputs:
    """Output files reserved before generating: each is a temp file in its target's directory,
    renamed over the target only when everything was written (no half-written results)."""

    def __init__(
        self, targets: Sequence[Path], suffix: str = ".png", why: str = "parameters are stored as PNG metadata"
    ):
        self.targets = [Path(p) for p in targets]
        self.suffix, self.why = suffix, why
        self.temps: list[Path] = []
        seen = set()
        for p in self.targets:
            key = os.path.abspath(p)
            if key in seen:
                raise CLIError(f"output path {str(p)!r} is used twice (image and maps must differ)")
            seen.add(key)
        try:
            for p in self.targets:
                self.temps.append(self._reserve(p))
        except BaseException:
            self.discard()
            raise

    def _reserve(self, path: Path) -> Path:
        if path.suffix.lower() != self.suffix:
            raise CLIError(f"output {str(path)!r} must end in {self.suffix} ({self.why})")
        parent = path.parent
        if not parent.is_dir():
            raise CLIError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
        if path.is_dir():
            raise CLIError(f"cannot write {str(path)!r}: it is a directory")
        tmp = parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "xb"):
                pass
        except OSError as err:
            raise CLIError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
        return tmp

    def commit(self) -> list[Path]:
        for tmp, target in zip(self.temps, self.targets):
            os.replace(tmp, target)
        self.temps = []
        return self.targets

    def discard(self) -> None:
        for tmp in self.temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.temps = []
