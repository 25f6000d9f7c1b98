"""Atomic file writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[str]:
    """Yield a temporary path next to ``dest``; after the block it is renamed onto ``dest``.

    The file gets the usual permissions (mkstemp's are owner-only). If the block raises, the
    temporary file is removed and ``dest`` is untouched.
    """
    d = Path(dest)
    d.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{d.name}.", dir=d.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, d)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(dest: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``dest`` atomically."""
    with atomic_path(dest) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")
