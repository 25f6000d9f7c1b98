"""Type-check the package as it installs: ``edgecompress`` with the four root folders inside it.

The folders ``compress/``, ``export/``, ``runtimes/`` and ``targets/`` install as
``edgecompress.<folder>`` (setuptools ``package-dir``); mypy reads files, not import hooks, so it
is run over a tree of links that has the installed layout (``build/typecheck/edgecompress``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("compress", "export", "runtimes", "targets")


def link_tree(dest: Path) -> Path:
    pkg = dest / "edgecompress"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", *FOLDERS):
        link = pkg / name
        source = ROOT / "edgecompress" / name if name == "__init__.py" else ROOT / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return pkg


def main() -> int:
    pkg = link_tree(ROOT / "build" / "typecheck")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(pkg)]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    raise SystemExit(main())
