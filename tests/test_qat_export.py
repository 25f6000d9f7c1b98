"""QDQ ONNX export matches the fake-quantized torch model on onnxruntime; CLI, recipe stage and torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.mark.parametrize(("bits", "per_channel"), [(4, True), (3, False)])
def test_onnxruntime_agrees_with_fake_quant_on_test_split(cnn_checkpoint: Path, mnist_splits, tmp_path: Path,
                                                          bits: int, per_channel: bool) -> None:  # fmt: skip
    import onnx

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_torch_onnx
    from edgecompress.compress.qat import GAQATConfig
    from edgecompress.compress.qat.train import onnx_agreement, quantize_model

    bundle = load_checkpoint(cnn_checkpoint)
    cfg = GAQATConfig(bits=bits, per_channel=per_channel)
    model = quantize_model(bundle.module, cfg, mnist_splits.train.x)
    art = export_torch_onnx(bundle.derive(model), tmp_path / "art")
    assert art.manifest.format == "onnx-qdq"
    check = onnx_agreement(model, art.model_path, mnist_splits.test)
    assert check["top1_agreement"] >= 99.5
    assert check["sqnr_db"] > 30.0
    assert abs(check["torch_accuracy"] - check["onnxruntime_accuracy"]) <= 0.5
    graph = onnx.load(str(art.model_path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") >= 8 and "QuantizeLinear" in ops and "Clip" in ops
    # weights are stored as integers on the trained grid: middle layers within [-2^(b-1), 2^(b-1) - 1]
    assert "Constant" not in ops  # weights, scales and zero points are initializers
    int_weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer
                    if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]  # fmt: skip
    assert len(int_weights) == 4
    inner = [w for w in int_weights if np.abs(w).max() <= 2 ** (bits - 1)]
    assert len(inner) == 2 and all(
        w.min() >= -(2 ** (bits - 1)) and w.max() <= 2 ** (bits - 1) - 1 for w in inner
    )
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2 for i in graph.initializer)


def test_cli_qat_writes_artifact_log_and_plot(cli, cnn_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "qat"
    code, stdout, err = cli("qat", cnn_checkpoint, "--data", "mnist", "--bits", "4", "--method", "gaqat",
                            "--max-steps", "6", "--warmup", "0", "-o", out, "--json")  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    assert manifest["format"] == "onnx-qdq" and manifest["extra"]["bits_weights"] == 4
    assert manifest["metrics"]["onnx_check"]["top1_agreement"] >= 99.5
    assert summary["metrics"]["onnx_check"]["sqnr_db"] > 25
    records = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all("conflict" in r for r in records)
    assert (out / "gaqat_conflict.png").stat().st_size > 1000


def test_cli_rejects_unknown_method(cli, cnn_checkpoint: Path, tmp_path: Path) -> None:
    code, _, err = cli("qat", cnn_checkpoint, "--data", "mnist", "--method", "lsq++", "-o", tmp_path / "x")
    assert code == 2
    assert "qat, qat-sam, qat-sagm, gaqat" in err


def test_recipe_stage_runs_and_reloads(cnn_checkpoint: Path, mnist_splits, tmp_path: Path) -> None:
    import torch

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.stages import StageContext, get_stage

    spec = get_stage("qat")
    cfg = spec.config_cls.model_validate({"bits": 4, "method": "qat-sagm", "max_steps": 4})
    bundle = load_checkpoint(cnn_checkpoint)
    out = spec.run(bundle, cfg, StageContext(out_dir=tmp_path, splits=mnist_splits))
    assert out.bundle is not None and "conflict" in out.metrics
    again = spec.load(tmp_path, bundle, cfg)
    x = torch.from_numpy(mnist_splits.test.x[:32])
    with torch.no_grad():
        assert torch.equal(out.bundle.module.eval()(x), again.bundle.module(x))


def test_torchrun_two_processes(cnn_checkpoint: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a free port: other test sessions may run torchrun at the same time
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "edgecompress.compress.cli.app", "qat", str(cnn_checkpoint), "--data", "mnist", "--bits", "4",
           "--method", "gaqat", "--max-steps", "3", "--warmup", "0", "-o", str(out), "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["steps"] == 3
    assert summary["metrics"]["onnx_check"]["top1_agreement"] >= 99.5
