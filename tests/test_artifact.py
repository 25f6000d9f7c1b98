from __future__ import annotations

import json

import pytest
import torch

from edgecompress.compress.models import create_model, list_models
from edgecompress.export import ArtifactError, artifact_writer, export_onnx, load_artifact
from edgecompress.targets import get_target


@pytest.fixture(scope="module")
def cnn_artifact(tmp_path_factory):
    torch.manual_seed(0)
    return export_onnx(create_model("cnn").eval(), (1, 28, 28), tmp_path_factory.mktemp("a") / "art",
                       target=get_target("x86-64"), model_name="cnn")  # fmt: skip


def test_manifest_contents(cnn_artifact):
    m = cnn_artifact.manifest
    assert m.format == "onnx" and m.model_file == "model.onnx" and m.target["name"] == "x86-64"
    assert m.inputs[0].shape == ["batch", 1, 28, 28]
    assert set(m.files) == {"model.onnx"} and len(m.files["model.onnx"]) == 64
    assert m.metrics["export_check"]["sqnr_db"] > 80
    assert m.stages[-1].stage == "export-onnx"
    import onnx

    model = onnx.load(str(cnn_artifact.model_path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_tampered_file_detected(cnn_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cnn_artifact.path, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest hash"):
        load_artifact(copy)


def test_unknown_manifest_version(cnn_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cnn_artifact.path, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    raw["manifest_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="version 99"):
        load_artifact(copy)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path)


def test_writer_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), artifact_writer(dest) as tmp:
        (tmp / "model.onnx").write_bytes(b"partial")
        raise RuntimeError("crash mid-write")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_atomically(cnn_artifact, tmp_path):
    dest = tmp_path / "out"
    export_onnx(create_model("squeezenet").eval(), (1, 28, 28), dest, model_name="a")
    first = load_artifact(dest).hash
    export_onnx(create_model("resnet").eval(), (1, 28, 28), dest, model_name="b")
    assert load_artifact(dest).hash != first and load_artifact(dest).manifest.model_name == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("name", list_models())
def test_every_example_model_exports_and_matches(name, tmp_path):
    from edgecompress.compress.models import builtin_model_spec

    torch.manual_seed(0)
    spec = builtin_model_spec(name)  # each model's own inputs: images, or token ids and a mask
    art = export_onnx(create_model(name).eval(), spec, tmp_path / name, model_name=name)
    check = art.manifest.metrics["export_check"]
    assert check["sqnr_db"] > 60 and check["cosine"] > 0.9999
    assert [i.name for i in art.manifest.inputs] == spec.input_names
    # Dynamic batch: the artifact runs at another batch size than it was exported with.
    from edgecompress.runtimes import runtime_for

    out = runtime_for(art).prepare(art).run(spec.example_feeds(5))
    classes = {"efficientnet-lite1": 1000, "efficientnet-lite2": 1000, "text-encoder": 128}
    assert art.manifest.outputs[0].shape == ["batch", classes.get(name, 10)]
    assert out.shape == (5, *art.manifest.outputs[0].shape[1:])
