"""Layer selection shared by every technique and by recipes.

A :class:`Scope` selects modules by class name (``Conv2d``) or by a ``re:`` regular expression
over the module's qualified name (``re:features\\.[0-3]\\.``). ``exclude`` wins over ``include``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict, field_validator


class Scope(BaseModel):
    """Which modules a technique touches.

    Example:
        >>> Scope(include=["Linear"], exclude=["re:head"]).matches("blocks.0.fc1", torch.nn.Linear(2, 2))
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: list[str] = ["Linear", "Conv2d"]
    exclude: list[str] = []

    @field_validator("include", "exclude")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as exc:
                    raise ValueError(f"bad regular expression in scope pattern {p!r}: {exc}") from None
            elif not p:
                raise ValueError("empty scope pattern")
        return patterns

    @staticmethod
    def _hit(pattern: str, name: str, module: object) -> bool:
        if pattern.startswith("re:"):
            return re.search(pattern[3:], name) is not None
        return any(cls.__name__ == pattern for cls in type(module).__mro__)

    def matches(self, name: str, module: object) -> bool:
        """Whether the module called ``name`` is in scope."""
        if any(self._hit(p, name, module) for p in self.exclude):
            return False
        return any(self._hit(p, name, module) for p in self.include)

    def select(self, model) -> Iterator[tuple[str, object]]:
        """Yield ``(name, module)`` for every sub-module of ``model`` in scope (the root excluded)."""
        for name, module in model.named_modules():
            if name and self.matches(name, module):
                yield name, module

    def layers(self, model, kinds: tuple[type, ...], technique: str, *, keep=None, why: str = "") -> list[tuple[str, object]]:
        """The ``(name, module)`` in scope that are of ``kinds`` (and pass ``keep(name, module)``).

        Raises:
            ConfigError: none is: the message names the technique, the scope and what would match.
        """
        chosen = [(n, m) for n, m in self.select(model) if isinstance(m, kinds) and (keep is None or keep(n, m))]
        if not chosen:
            self.nothing_selected(model, kinds, technique, why=why)
        return chosen

    def nothing_selected(self, model, kinds: tuple[type, ...], technique: str, *, why: str = "") -> None:
        """Raise the error of a scope that selects no layer the technique can change."""
        from edgecompress.compress.errors import ConfigError

        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(
            f"the {technique} scope (include {self.include}, exclude {self.exclude}) selects no {names} layer of "
            f"{type(model).__name__}{why}; set scope.include to class names ({', '.join(k.__name__ for k in kinds)}) "
            "or 're:' patterns over module names"
        )
