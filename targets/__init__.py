"""Device targets as data: what each device runs and how to reach it.

Example:
    >>> from edgecompress.targets import get_target
    >>> get_target("x86-64").tvm["kind"]
    'llvm'
"""

from edgecompress.targets.errors import TargetError, UnknownTargetError, UnsupportedOnTargetError
from edgecompress.targets.host import HostCPU, detect_host, runs_on_host
from edgecompress.targets.registry import get_target, list_targets, load_targets_file, register_target
from edgecompress.targets.target import Budgets, Remote, Target

__all__ = [
    "Budgets",
    "HostCPU",
    "Remote",
    "Target",
    "TargetError",
    "UnknownTargetError",
    "UnsupportedOnTargetError",
    "detect_host",
    "get_target",
    "list_targets",
    "load_targets_file",
    "register_target",
    "runs_on_host",
]
