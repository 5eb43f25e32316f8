"""The package laid out as it is installed, for tools that read packages from the file system.

pyproject maps ``processors/``, ``pipelines/`` and ``app/`` into the package as
``attnctrl.processors`` / ``.pipelines`` / ``.app`` (setuptools ``package-dir``); import-linter and
mypy cannot follow that mapping, so `installed_layout()` copies the tree into a temporary folder in
the installed shape and yields that folder (put it on PYTHONPATH / run the tool inside it).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = ("processors", "pipelines", "app")  # attnctrl.<name> ← <name>/


@contextmanager
def installed_layout() -> Iterator[Path]:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "assets")
    with tempfile.TemporaryDirectory(prefix="attnctrl-layout-") as tmp:
        package = Path(tmp) / "attnctrl"
        shutil.copytree(ROOT / "attnctrl", package, ignore=ignore)
        for name in MAPPED:
            shutil.copytree(ROOT / name, package / name, ignore=ignore)
        yield Path(tmp)
