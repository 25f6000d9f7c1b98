"""onnxruntime mobile format (.ort with XNNPACK settings) and torch.export programs compiled by TVM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def _untrained_cnn(folder: Path):
    """The example CNN with seeded random weights (conversion and compilation need no training)."""
    import torch

    from edgecompress.compress.checkpoint import ModelBundle, save_checkpoint
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, in_chans=1).eval()
    bundle = ModelBundle(model, "cnn", (1, 28, 28), {}, 10, {})
    return model, save_checkpoint(bundle, folder / "cnn.pt", model_kwargs={"num_classes": 10})


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory):
    return _untrained_cnn(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def cnn_onnx(cnn, tmp_path_factory: pytest.TempPathFactory):
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.targets import get_target

    return export_model(load_checkpoint(cnn[1]), "onnx", get_target("x86-64"), tmp_path_factory.mktemp("onnx") / "cnn")


def _run(path: Path, x: np.ndarray, config: dict[str, str] | None = None) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    for k, v in (config or {}).items():
        opts.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_ort_export_matches_onnx(cnn_onnx, tmp_path: Path) -> None:
    from edgecompress.compress.exporting import export_formats, export_model
    from edgecompress.export import load_artifact
    from edgecompress.runtimes.ort_runtime import OrtRuntime
    from edgecompress.targets import get_target

    assert "ort" in export_formats()
    tgt = get_target("arm64-android")
    art = export_model(cnn_onnx, "ort", tgt, tmp_path / "ort")
    m = load_artifact(art.path).manifest
    assert m.format == "ort" and m.model_file == "model.ort" and art.model_path.read_bytes()[4:8] == b"ORTM"
    assert m.parent_hash == cnn_onnx.hash
    session = m.extra["ort_session"]
    assert session["providers"][0] == "XnnpackExecutionProvider"
    assert session["provider_options"]["XnnpackExecutionProvider"] == {"intra_op_num_threads": str(tgt.num_threads)}
    assert session["intra_op_num_threads"] == 1 and session["session_config"]["session.intra_op.allow_spinning"] == "0"
    assert m.metrics["export_check"]["sqnr_db"] > 60
    x = np.random.default_rng(3).standard_normal((5, 1, 28, 28)).astype(np.float32)
    ref = _run(cnn_onnx.model_path, x)
    np.testing.assert_allclose(_run(art.model_path, x, session["session_config"]), ref, rtol=1e-5, atol=1e-5)
    # the project's runtime opens it too (XNNPACK is skipped where this onnxruntime lacks it)
    sess = OrtRuntime().prepare(art, None)
    np.testing.assert_allclose(sess.run(x), ref, rtol=1e-5, atol=1e-5)
    # ... with the manifest's session settings: its config entries, and XNNPACK's thread pool
    # handed to onnxruntime's own pool since this build has no XNNPACK
    opts = sess._sess.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.get_session_config_entry("session.enable_saved_runtime_optimizations") == "1"
    assert sess.threads == opts.intra_op_num_threads == tgt.num_threads
    assert OrtRuntime().prepare(art, None, threads=1).threads == 1  # an explicit count wins


def test_cli_export_ort(cnn, cli, tmp_path: Path) -> None:
    from edgecompress.export import load_artifact

    out = tmp_path / "cnn-ort"
    code, stdout, err = cli("export", cnn[1], "--format", "ort", "--target", "arm64-android", "-o", out)
    assert code == 0, err
    art = load_artifact(out)
    assert art.manifest.format == "ort" and (out / "model.ort").is_file()
    assert art.manifest.extra["source_format"] == "onnx"
    assert art.manifest.target["name"] == "arm64-android"
    code, _, err = cli("export", cnn[1], "--format", "ort", "--tune", "1m", "-o", tmp_path / "x")
    assert code != 0 and "tvm" in err


def test_pt2_program_compiles_to_tvm(cnn, tmp_path: Path) -> None:
    import torch

    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import export_model
    from edgecompress.export import load_artifact
    from edgecompress.export.tvm.exporter import run_local
    from edgecompress.targets import get_target

    model = cnn[0]
    program = torch.export.export(model, (torch.randn(1, 1, 28, 28),))
    torch.export.save(program, str(tmp_path / "cnn.pt2"))
    bundle = load_checkpoint(tmp_path / "cnn.pt2")
    assert bundle.exported_program is not None
    art = export_model(bundle, "tvm", get_target("x86-64"), tmp_path / "tvm", use_database=False)
    m = load_artifact(art.path).manifest
    assert m.format == "tvm" and m.extra["source_format"] == "torch.export"
    assert not any(s.stage == "export-onnx" for s in m.stages)
    assert m.metrics["export_check"]["reference"].startswith("torch")
    x = np.random.default_rng(4).standard_normal((3, 1, 28, 28)).astype(np.float32)
    out = run_local(art.model_path, art.path / m.extra["params_file"], x, m.extra["batch"])[0]
    with torch.no_grad():
        ref = torch.cat([bundle.exported_program.module()(torch.from_numpy(x[i : i + 1])) for i in range(3)]).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
