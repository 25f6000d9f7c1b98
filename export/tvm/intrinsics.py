"""TVM's tensor intrinsics, imported once for MetaSchedule, with this project's fixes.

MetaSchedule's CPU rules tensorize with intrinsics it finds by name (``dot_16x4_vnni`` on x86 VNNI,
``dot_4x4_i8i8s32_sdot`` on ARM64 with the dot-product extension); they exist once
``tvm.s_tir.tensor_intrin`` is imported. Tuning, the record checks and the ARM64 tooling
(:mod:`edgecompress.export.tvm.int8_arm`) import it; it imports none of them (only the x86 VNNI fix).
"""

from __future__ import annotations

from typing import Any


def import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (needed by MetaSchedule) with a cheap ``inspect.stack``.

    Each of the hundreds of TVMScript functions in ``tvm.s_tir.tensor_intrin`` calls
    ``inspect.stack()``, which looks up a module for every frame by scanning ``sys.modules``;
    with torch loaded that import takes minutes on a busy machine. TVMScript reads only the
    source line of the decorator's caller (the third frame), so the others are built without it.
    """
    import inspect
    import sys

    from edgecompress.export.tvm.int8_x86 import register_vnni_intrinsic

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        register_vnni_intrinsic()  # TVM's own VNNI intrinsic does not build with its LLVM
        return
    original = inspect.stack

    def cheap_stack(context: int = 1) -> list[inspect.FrameInfo]:
        frames: list[inspect.FrameInfo] = []
        frame: Any = sys._getframe(1)
        while frame is not None:
            if len(frames) < 3:
                info = inspect.getframeinfo(frame, context)
                frames.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                code = frame.f_code
                frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None,
                                                positions=None))  # fmt: skip
            frame = frame.f_back
        return frames

    inspect.stack = cheap_stack  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original  # type: ignore[assignment]
    register_vnni_intrinsic()
