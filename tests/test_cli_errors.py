"""Bad input: a clear message, the documented exit code, and no output folder left behind."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _no_output(path) -> bool:
    return not path.exists() and not any(p.name.startswith(f".{path.name}") for p in path.parent.iterdir())


def test_truncated_checkpoint(cnn_checkpoint, tmp_path, cli):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(cnn_checkpoint.read_bytes()[:1000])
    code, _, err = cli("export", bad, "-o", tmp_path / "out")
    assert code == 2 and "truncated" in err and "Traceback" not in err
    assert _no_output(tmp_path / "out")


def test_pickle_with_code_refused(tmp_path, cli):
    from edgecompress.compress.models import create_model

    p = tmp_path / "evil.pt"
    torch.save({"state_dict": create_model("cnn").state_dict(), "x": _Evil()}, p)
    code, _, err = cli("export", p, "--model-factory", "cnn", "-o", tmp_path / "out")
    assert code == 2 and "--trust-pickle" in err
    assert _no_output(tmp_path / "out")


def test_state_dict_mismatch(tmp_path, cli):
    from edgecompress.compress.models import create_model

    p = tmp_path / "sd.pt"
    torch.save(create_model("vit").state_dict(), p)
    code, _, err = cli("export", p, "--model-factory", "cnn", "-o", tmp_path / "out")
    assert code == 2 and "does not match" in err
    assert _no_output(tmp_path / "out")


def test_wrong_input_shape(cnn_checkpoint, tmp_path, cli):
    code, _, err = cli("export", cnn_checkpoint, "--input-shape", "3,32,32", "-o", tmp_path / "out")
    assert code == 2 and "does not accept inputs" in err
    assert _no_output(tmp_path / "out")


def test_unknown_target_lists_known(cnn_checkpoint, tmp_path, cli):
    code, _, err = cli("export", cnn_checkpoint, "--target", "arm64/andriod", "-o", tmp_path / "out")
    assert code == 2 and "arm64-android" in err and "known:" in err
    assert _no_output(tmp_path / "out")


def test_recipe_unknown_key(tmp_path, cli):
    r = tmp_path / "r.yaml"
    r.write_text("version: 1\nmodel: {example: cnn}\ntargest: [x86-64]\n")
    code, _, err = cli("run", r, "-o", tmp_path / "run")
    assert code == 2 and "targest" in err and "valid keys" in err and "targets" in err
    assert not (tmp_path / "run").exists()


def test_recipe_unknown_stage(tmp_path, cli):
    r = tmp_path / "r.yaml"
    r.write_text("version: 1\nmodel: {example: cnn}\nstages:\n  - prune_magic: {}\n")
    code, _, err = cli("run", r, "-o", tmp_path / "run", "--dry-run")
    assert code == 2 and "unknown stage 'prune_magic'" in err


def test_empty_dataset_folder(cnn_checkpoint, tmp_path, cli):
    art = tmp_path / "art"
    assert cli("export", cnn_checkpoint, "-o", art)[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("check", art, "--data", empty)
    assert code == 2 and "no class sub-folders" in err


def test_nan_in_npz(cnn_checkpoint, tmp_path, cli):
    art = tmp_path / "art"
    assert cli("export", cnn_checkpoint, "-o", art)[0] == 0
    x = np.zeros((20, 1, 28, 28), dtype=np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 10)
    code, _, err = cli("check", art, "--data", tmp_path / "d.npz")
    assert code == 2 and "NaN" in err


def test_tampered_artifact(cnn_checkpoint, tmp_path, cli):
    art = tmp_path / "art"
    assert cli("export", cnn_checkpoint, "-o", art)[0] == 0
    with (art / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    code, _, err = cli("profile", art)
    assert code == 2 and "manifest hash" in err


def test_missing_required_option(cli):
    code, _, err = cli("export")
    assert code == 2 and "Missing argument" in err


@pytest.mark.parametrize("bad", ["1,x,3", "0,28,28"])
def test_bad_input_shape_syntax(cnn_checkpoint, tmp_path, cli, bad):
    code, _, err = cli("export", cnn_checkpoint, "--input-shape", bad, "-o", tmp_path / "o")
    assert code == 2 and "--input-shape" in err
