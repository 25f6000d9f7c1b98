"""Errors of the runtimes domain."""

from __future__ import annotations


class RuntimeUnavailableError(ImportError):
    """The runtime's library is not installed or cannot run this artifact here (exit code 3)."""


class RuntimeExecutionError(RuntimeError):
    """The runtime failed while loading or running an artifact (exit code 1)."""


class DeviceConnectionError(ConnectionError):
    """A remote device (TVM RPC server or tracker) cannot be reached, refused the key, or dropped (exit 3)."""
