"""Errors of the targets domain."""

from __future__ import annotations


class TargetError(ValueError):
    """A target name or target file is wrong (bad input: CLI exit code 2)."""


class UnknownTargetError(TargetError, KeyError):
    """No target of that name is registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class UnsupportedOnTargetError(NotImplementedError):
    """The target cannot run what was asked (a precision, a format): CLI exit code 3."""
