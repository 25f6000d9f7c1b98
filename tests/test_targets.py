from __future__ import annotations

import pytest

from edgecompress.targets import (
    Target,
    TargetError,
    UnknownTargetError,
    UnsupportedOnTargetError,
    get_target,
    list_targets,
    load_targets_file,
)
from edgecompress.targets.host import HostCPU


def test_builtin_targets_present_with_tvm_dicts():
    names = {t.name for t in list_targets()}
    assert {"x86-64", "arm64-linux", "arm64-android", "cuda-sm80", "cuda-sm90", "opencl-mali", "opencl-adreno"} <= names
    for t in list_targets():
        assert isinstance(t.tvm, dict) and t.tvm["kind"] in {"llvm", "cuda", "opencl"}
        assert t.ort_providers and t.precisions


def test_aliases_resolve():
    assert get_target("cuda").name == "cuda-sm80"
    assert get_target("arm64/android").name == "arm64-android"
    assert get_target("opencl-mobile").name == "opencl-mali"


def test_unknown_target_lists_known_and_suggests():
    with pytest.raises(UnknownTargetError) as exc:
        get_target("arm64/andriod")
    msg = str(exc.value)
    assert "arm64/android" in msg and "x86-64" in msg and "known:" in msg


def test_glob():
    assert [t.name for t in list_targets("cuda-*")] == ["cuda-sm80", "cuda-sm90"]


@pytest.mark.parametrize(
    ("flags", "mcpu"),
    [
        ({"avx2"}, "haswell"),
        ({"avx2", "avx512f"}, "skylake-avx512"),
        ({"avx2", "avx512f", "avx512_vnni"}, "cascadelake"),
        ({"avx2", "avx512f", "avx512_vnni", "amx_tile"}, "sapphirerapids"),
        (set(), "x86-64"),
    ],
)
def test_host_mcpu_mapping(flags, mcpu):
    assert HostCPU("x86_64", frozenset(flags), 2).llvm_mcpu == mcpu


def test_require_precision():
    t = get_target("opencl-mali")
    t.require("fp16")
    with pytest.raises(UnsupportedOnTargetError, match="int8"):
        t.require("int8", "PTQ")


def test_invalid_target_definition():
    with pytest.raises(TargetError, match="unknown kind"):
        Target(name="x", kind="toaster", description="", tvm={"kind": "llvm"})
    with pytest.raises(TargetError, match="'kind' key"):
        Target(name="x", kind="cpu", description="", tvm={})


def test_targets_file_yaml_and_toml(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text(
        "targets:\n  my-pi5:\n    extends: arm64-linux\n    remote: {mode: rpc, host: 127.0.0.1, port: 9091, key: pi5}\n"
        "    budgets: {max_latency_ms: 20}\n"
    )
    (t,) = load_targets_file(y)
    assert t.name == "my-pi5" and t.tvm["mtriple"] == "aarch64-linux-gnu" and t.remote.port == 9091
    assert t.budgets.max_latency_ms == 20
    assert get_target("my-pi5") is t
    toml = tmp_path / "t.toml"
    toml.write_text('[my-box]\nkind = "cpu"\ntvm = {kind = "llvm", mcpu = "znver4"}\n')
    (b,) = load_targets_file(toml)
    assert b.tvm["mcpu"] == "znver4"


def test_targets_file_unknown_key(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("bad:\n  kind: cpu\n  tvm: {kind: llvm}\n  colour: red\n")
    with pytest.raises(TargetError, match="colour.*valid"):
        load_targets_file(y)
