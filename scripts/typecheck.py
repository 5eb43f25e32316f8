"""mypy on the package as installed (see `installed_layout`), with the settings in pyproject.toml
(``[tool.mypy]``). Exit status: mypy's.

    python scripts/typecheck.py
"""

from __future__ import annotations

import subprocess
import sys

from installed_layout import ROOT, installed_layout


def main() -> int:
    with installed_layout() as tmp:
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "attnctrl"]
        return subprocess.call(cmd, cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
