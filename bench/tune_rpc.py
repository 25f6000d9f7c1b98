"""Tuning through a device server (loopback RPC) vs in this process: same model, budget and fresh databases.

The RPC runner uploads each candidate to the device and times it there; on loopback the device is
this machine, so the difference between the two is what the remote path costs. The runs alternate
(in-process, RPC, in-process, RPC) in one process so that machine load affects both alike.

    python bench/tune_rpc.py [--trials 32] [--per-task 16]

The model is the example CNN with 3x28x28 inputs and 7 classes, so no shipped database covers it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_info, markdown_table, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--per-task", type=int, default=16)
    args = ap.parse_args(argv)

    import torch

    from edgecompress.compress.checkpoint import ModelBundle
    from edgecompress.compress.exporting import export_model
    from edgecompress.compress.models import create_model
    from edgecompress.runtimes.tvm_rpc import DeviceServer
    from edgecompress.targets import get_target

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn", num_classes=7, in_chans=3).eval(), "cnn", (3, 28, 28), {}, 7, {})
    host = get_target("x86-64")
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        onnx_art = export_model(bundle, "onnx", host, tmp / "onnx")
        with DeviceServer(40000 + (int(time.time()) % 5000), key="bench") as srv:
            device = {"rpc": srv.address, "key": "bench"}
            for i, (label, extra) in enumerate([("in-process", {}), ("loopback RPC", device),
                                                ("in-process", {}), ("loopback RPC", device)]):  # fmt: skip
                t0 = time.perf_counter()
                art = export_model(onnx_art, "tvm", host, tmp / f"t{i}", tune=args.trials, trials_per_task=args.per_task,
                                   database_dir=tmp / f"db{i}", **extra)  # fmt: skip
                r = art.manifest.extra["tuning"]
                rows.append([i + 1, label, r["trials"], r["tasks_tuned"], r["seconds"], round(time.perf_counter() - t0, 2),
                             round(r["seconds"] / max(r["trials"], 1), 3)])  # fmt: skip
    cols = ["order", "mode", "trials", "tasks tuned", "tuning s", "export wall s", "s per trial"]
    md = f"Tuning in-process vs through a loopback device server ({args.trials} trials, {args.per_task} per task)\n\n"
    md += markdown_table(cols, rows)
    write_results("tune_rpc", {"machine": machine_info(), "columns": cols, "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
