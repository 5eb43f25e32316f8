"""Check the import contract in pyproject.toml (``[tool.importlinter]``) with import-linter.

pyproject maps ``processors/``, ``pipelines/`` and ``app/`` into the package as
``attnctrl.processors`` / ``.pipelines`` / ``.app`` (setuptools ``package-dir``). import-linter reads
packages from the file system, so this lays the package out as it is installed (a copy in a
temporary folder) and runs ``lint-imports`` on that. Exit status: lint-imports'.

    python scripts/lint_imports.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"processors": "processors", "pipelines": "pipelines", "app": "app"}  # attnctrl.<name> ← <folder>


def main() -> int:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "assets")
    with tempfile.TemporaryDirectory(prefix="attnctrl-imports-") as tmp:
        package = Path(tmp) / "attnctrl"
        shutil.copytree(ROOT / "attnctrl", package, ignore=ignore)
        for name, folder in MAPPED.items():
            shutil.copytree(ROOT / folder, package / name, ignore=ignore)
        env = {**os.environ, "PYTHONPATH": tmp}
        lint = shutil.which("lint-imports") or "lint-imports"
        return subprocess.call([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
