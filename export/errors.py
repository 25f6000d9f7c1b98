"""Errors of the export domain."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Turning a model into an artifact failed (CLI exit code 1 unless a subclass says otherwise)."""


class ArtifactError(ValueError):
    """An artifact folder is missing, of an unknown version, or fails its hash check (exit code 2)."""


class UnsupportedExportError(NotImplementedError):
    """The model cannot be exported in this format for this target: an operator or a precision (exit 3)."""


class SpecError(ValueError):
    """Model inputs/outputs, or data that must fit them, are malformed or do not match (exit code 2)."""


class CompiledOutputError(ExportError, NotImplementedError):
    """Compiled code computes something other than the reference it was built from (exit code 3):
    the compiler cannot export this model correctly for this target."""
