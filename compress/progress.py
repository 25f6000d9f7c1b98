"""Progress reporting without printing from library code.

Library code calls :func:`progress` around long loops; it does nothing unless the CLI installed a
factory (a rich progress bar, only when stderr is a terminal).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def update(self, **fields: Any) -> None: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


_factory: Callable[[str, int | None], contextlib.AbstractContextManager[ProgressTask]] | None = None


def set_progress_factory(factory: Callable[[str, int | None], contextlib.AbstractContextManager[ProgressTask]] | None) -> None:
    """Install (or remove, with None) the factory that creates progress bars. Used by the CLI."""
    global _factory
    _factory = factory


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[ProgressTask]:
    """A progress task for ``total`` units of work (a no-op unless the CLI installed a bar)."""
    if _factory is None:
        yield _NullTask()
        return
    with _factory(description, total) as task:
        yield task
