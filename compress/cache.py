"""Where the toolchain keeps reusable work: example checkpoints, datasets, tuning databases."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (``$EDGECOMPRESS_CACHE`` or the user cache dir), with ``parts`` appended and created."""
    root = os.environ.get("EDGECOMPRESS_CACHE")
    if root:
        base = Path(root)
    else:
        from platformdirs import user_cache_dir

        base = Path(user_cache_dir("edgecompress"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
