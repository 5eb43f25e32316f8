"""Check the import contract in pyproject.toml (``[tool.importlinter]``) with import-linter, on the
package as installed (see `installed_layout`). Exit status: lint-imports'.

    python scripts/lint_imports.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from installed_layout import ROOT, installed_layout


def main() -> int:
    with installed_layout() as tmp:
        lint = shutil.which("lint-imports") or "lint-imports"
        env = {**os.environ, "PYTHONPATH": str(tmp)}
        return subprocess.call([lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
