"""What tuning on a device needs from the export layer: its errors, and how a compiled candidate
is packaged for the device (a cross-linked ``.so`` or a ``.tar`` it links when loading it). The
runner that times candidates on the device over TVM RPC is
:class:`edgecompress.runtimes.tvm_tuning.TuningDevice`, passed to tuning as a plain object.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecompress.export.errors import ExportError


class TuningDeviceError(ExportError, ConnectionError):
    """The device measuring tuning candidates stopped answering (exit code 3); the work done so far is kept."""


class TuningNeedsDeviceError(ExportError, ValueError):
    """Tuning was asked for a target whose code runs on another device, and no device was given (exit code 2)."""


def candidate_packager(plan: Any) -> Callable[[Any], str]:
    """How a compiled candidate becomes a file the device loads (per the target's library plan)."""
    return functools.partial(_package_candidate, plan)


def _package_candidate(plan: Any, rt_mod: Any) -> str:
    from edgecompress.export.tvm import compile as tc

    # a fresh folder per candidate: MetaSchedule removes the artifact's folder after the run
    return str(tc.export_library(rt_mod, Path(tempfile.mkdtemp(prefix="edgecompress-ms-")), plan))
