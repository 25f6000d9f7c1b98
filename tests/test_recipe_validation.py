"""A table of bad recipes: each is refused up front with a message naming the problem."""

from __future__ import annotations

import pytest

from edgecompress.compress.errors import ConfigError, UnsupportedError
from edgecompress.compress.recipe import parse_recipe, resolved_dict

BASE = {"version": 1, "model": {"example": "cnn"}, "data": "mnist", "targets": ["x86-64"]}


def _r(**kw):
    return {**BASE, **kw}


@pytest.mark.parametrize(
    ("recipe", "error", "pattern"),
    [
        (_r(colour="red"), ConfigError, r"unknown key 'colour'; valid keys: .*stages"),
        (_r(version=2), ConfigError, "version 2 is not supported"),
        (_r(model={"example": "cnn", "checkpoint": "x.pt"}), ConfigError, "exactly one of"),
        (_r(model={"example": "cnn", "wieghts": 1}), ConfigError, "unknown key 'wieghts'; valid keys: example, checkpoint"),
        (_r(targets=["arm64/andriod"]), ConfigError, "did you mean 'arm64/android'"),
        (_r(export=[{"format": "onnx", "target": "cuda-sm80"}]), ConfigError, "not in targets"),
        (_r(gates={"cuda-sm80": {"max_size_mb": 1}}), ConfigError, "not in targets"),
        (_r(gates={"x86-64": {"max_sise_mb": 1}}), ConfigError, "unknown key 'max_sise_mb'; valid keys: max_accuracy_drop"),
        (_r(stages=[{"teleport": {}}]), ConfigError, "unknown stage 'teleport'"),
        (_r(stages=[{"sparsify": {}, "qat": {}}]), ConfigError, "one key"),
        (_r(stages=[{"sparsify": {"pattern": "5:4"}}]), ConfigError, r"stage 0 \(sparsify\)"),
        (_r(stages=[{"qat": {"bits": 1}}]), ConfigError, r"stage 0 \(qat\): bits"),
        (_r(stages=[{"ptq": {}}, {"qat": {}}]), UnsupportedError, "'qat' cannot come after 'ptq'"),
        (_r(stages=[{"qat": {}}, {"ptq": {}}]), UnsupportedError, "quantize it a second time"),
        (_r(stages=[{"codebook": {}}, {"ptq": {}}]), UnsupportedError, "lose the size gain"),
        (_r(stages=[{"qat": {}}, {"sparsify": {}}]), UnsupportedError, "sparsify before qat"),
        (_r(targets=["opencl-mali"], stages=[{"ptq": {}}]), UnsupportedError, "does not run"),
    ],
)
def test_bad_recipes(recipe, error, pattern):
    with pytest.raises(error, match=pattern):
        parse_recipe(recipe, "r.yaml")


def test_good_composition_resolves_every_default():
    r = parse_recipe(_r(stages=[{"sparsify": {"pattern": "2:4"}}, {"qat": {"bits": 4}}]), "r.yaml")
    d = resolved_dict(r)
    assert list(d["stages"][0]) == ["sparsify"] and d["stages"][0]["sparsify"]["pattern"] == "2:4"
    assert d["stages"][1]["qat"]["bits"] == 4 and "rho" in d["stages"][1]["qat"]


def test_sparsify_then_codebook_is_allowed():
    """The codebook stage keeps the N:M zeros (a reserved exact-zero codeword), so this order parses."""
    r = parse_recipe(_r(stages=[{"sparsify": {"pattern": "2:4"}}, {"codebook": {"bits": 3}}]), "r.yaml")
    assert [next(iter(s)) for s in resolved_dict(r)["stages"]] == ["sparsify", "codebook"]
