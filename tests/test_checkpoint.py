from __future__ import annotations

import os
import pickle

import pytest
import torch

from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from edgecompress.compress.errors import CheckpointError
from edgecompress.compress.models import create_model, list_models


def _bundle(name: str = "cnn") -> ModelBundle:
    torch.manual_seed(0)
    return ModelBundle(create_model(name), name, (1, 28, 28), {"scale": 1 / 255}, 10, {"note": "x"})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_roundtrip_our_format(tmp_path, suffix):
    b = _bundle()
    p = save_checkpoint(b, tmp_path / f"m{suffix}")
    loaded = load_checkpoint(p)
    assert loaded.model_name == "cnn" and loaded.input_shape == (1, 28, 28) and loaded.metadata == {"note": "x"}
    for k, v in b.module.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k])


def test_plain_state_dict_needs_factory(tmp_path):
    p = tmp_path / "sd.pth"
    torch.save(create_model("resnet").state_dict(), p)
    with pytest.raises(CheckpointError, match="--model-factory"):
        load_checkpoint(p)
    assert load_checkpoint(p, model_factory="resnet").input_shape == (1, 28, 28)


def test_state_dict_not_matching_factory(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(create_model("resnet").state_dict(), p)
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(p, model_factory="cnn")


def test_truncated_checkpoint(tmp_path):
    p = save_checkpoint(_bundle(), tmp_path / "m.pt")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": create_model("cnn").state_dict(), "payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(p, model_factory="cnn")


def test_whole_module_needs_trust_pickle(tmp_path):
    p = tmp_path / "whole.pt"
    torch.save(create_model("cnn"), p)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_checkpoint(p)
    b = load_checkpoint(p, trust_pickle=True, input_shape=(1, 28, 28))
    assert isinstance(b.module, torch.nn.Module)


def test_wrong_input_shape(tmp_path):
    p = save_checkpoint(_bundle(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="does not accept inputs"):
        load_checkpoint(p, input_shape=(3, 32, 32))


def test_factory_code_needs_permission(tmp_path):
    p = tmp_path / "sd.pt"
    torch.save(create_model("cnn").state_dict(), p)
    with pytest.raises(CheckpointError, match="explicit flag"):
        load_checkpoint(p, model_factory="edgecompress.compress.models.zoo:cnn")
    with pytest.raises(CheckpointError, match="--input-shape"):
        load_checkpoint(p, model_factory="edgecompress.compress.models.zoo:cnn", allow_code=True)
    b = load_checkpoint(p, model_factory="edgecompress.compress.models.zoo:cnn", allow_code=True, input_shape=(1, 28, 28))
    assert b.input_shape == (1, 28, 28)


def test_exported_program(tmp_path):
    m = create_model("cnn").eval()
    ep = torch.export.export(m, (torch.randn(1, 1, 28, 28),))
    torch.export.save(ep, tmp_path / "m.pt2")
    b = load_checkpoint(tmp_path / "m.pt2")
    x = torch.randn(1, 1, 28, 28)
    assert b.input_shape == (1, 28, 28)
    assert torch.allclose(b.module(x), m(x), atol=1e-5)


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path / "m.h5")


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_and_is_pickle_free(name):
    from edgecompress.compress.models import builtin_model_spec
    from edgecompress.export.torch_io import to_tensors

    m = create_model(name).eval()
    spec = builtin_model_spec(name)
    out = m(*to_tensors(spec.example_feeds(2), spec))
    assert out.shape[0] == 2 and (out.shape == (2, 10) or name not in ("cnn", "vit", "resnet"))
    assert all(isinstance(v, torch.Tensor) for v in m.state_dict().values())
    pickle.dumps(m.state_dict())


def test_exported_program_exports_to_onnx(tmp_path):
    from edgecompress.compress.exporting import export_model

    m = create_model("cnn").eval()
    torch.export.save(torch.export.export(m, (torch.randn(1, 1, 28, 28),)), tmp_path / "m.pt2")
    b = load_checkpoint(tmp_path / "m.pt2")
    art = export_model(b, "onnx", None, tmp_path / "art")
    assert art.manifest.metrics["export_check"]["sqnr_db"] > 60
    assert art.manifest.inputs[0].shape == [1, 1, 28, 28]  # the program's static batch is kept
