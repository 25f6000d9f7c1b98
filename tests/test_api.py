"""The Python API: ``import edgecompress as ec``, the same functions the CLI runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgecompress as ec

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)[0]


def test_readme_example_is_the_cli_lines(cnn_checkpoint: Path, tmp_path: Path, cli, capsys) -> None:
    """The README's Python example runs and writes the same ONNX model as its command lines."""
    py, sh = tmp_path / "py", tmp_path / "sh"
    for d in (py, sh):
        (d / "ex").mkdir(parents=True)
        shutil.copy(cnn_checkpoint, d / "ex" / "cnn.pt")
    cwd = os.getcwd()
    try:
        os.chdir(py)
        exec(compile(_readme_block("From Python", "python"), "README.md", "exec"), {})
        printed = capsys.readouterr().out.split()
        os.chdir(sh)
        for line in _readme_block("From Python", "bash").strip().splitlines():
            args = line.split()
            assert args[0] == "compress"
            code, _, err = cli(*args[1:], "--json")
            assert code == 0, err
    finally:
        os.chdir(cwd)
    assert float(printed[0]) > 0.4  # 2:4 in scope: half the weights are zero
    py_onnx = json.loads((py / "art" / "manifest.json").read_text())
    sh_onnx = json.loads((sh / "art" / "manifest.json").read_text())
    assert py_onnx["files"] == sh_onnx["files"]  # sha256 of every file: the same model
    assert py_onnx["format"] == sh_onnx["format"] == "onnx"


def test_import_is_light_and_verbs_are_documented() -> None:
    code = ("import sys, edgecompress as ec\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tvm', 'brevitas', 'xgboost') if m in sys.modules]\n"
            "print(heavy)\n"
            "import edgecompress.export.artifact\n"
            "print(callable(ec.export), ec.export.__module__)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    heavy, verb = out.splitlines()
    assert heavy == "[]"
    assert verb == "True edgecompress.compress.api.deploy"  # importing the sub-package keeps the verb
    for name in ec.VERBS:
        doc = getattr(ec, name).__doc__
        assert doc and "Example" in doc and len(doc.splitlines()) > 5, name


def test_module_and_arrays(tmp_path: Path) -> None:
    """An nn.Module with arrays in memory: no checkpoint, no files to prepare."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = np.random.default_rng(0).normal(size=(200, 1, 4, 4)).astype(np.float32)
    y = model(torch.from_numpy(x)).argmax(1).numpy()
    r = ec.sparsify(model, pattern="2:4", method="oneshot", input_shape=(1, 4, 4), data=(x, y),
                    workdir=tmp_path / "nm", max_drop=100.0)  # fmt: skip
    assert r.artifact.manifest.metrics["nm_sparsity"]["verified"]
    assert r.guard["status"] == "passed" and r.guard["samples"] > 0
    assert r.paths["checkpoint"].is_file()
    from edgecompress.compress.errors import CheckpointError

    with pytest.raises(CheckpointError, match="input_shape"):
        ec.sparsify(model, method="oneshot", workdir=tmp_path / "x")


def test_data_from_batches_and_a_transform() -> None:
    from edgecompress.compress.api.inputs import as_dataset, as_splits

    batches = [{"pixels": np.ones((8, 1, 2, 2)) * i, "label": np.full(8, i % 3)} for i in range(6)]
    ds = as_dataset(ec.Data(batches, transform=lambda b: (b["pixels"], b["label"])), "data")
    assert ds.x.shape == (48, 1, 2, 2) and ds.x.dtype == np.float32
    assert ds.labels.tolist() == [i % 3 for i in range(6) for _ in range(8)] and ds.num_classes == 3
    splits = as_splits(ec.Data(batches, transform=lambda b: (b["pixels"], b["label"])))
    assert sum(len(splits[r]) for r in ("train", "calib", "val", "test")) == 48
    multi = as_dataset({"ids": np.zeros((5, 7), np.int64), "mask": np.ones((5, 7), np.int64), "y": np.arange(5)}, "data")
    assert set(multi.inputs) == {"ids", "mask"} and multi.inputs["ids"].dtype == np.int64
    with pytest.raises(ValueError, match="iterable of batches"):
        as_dataset(3.5, "data")


def test_config_object_and_options_validated(tmp_path: Path) -> None:
    from edgecompress.compress.api.inputs import as_config
    from edgecompress.compress.errors import ConfigError
    from edgecompress.compress.sparsity import NMSparsityConfig

    cfg = as_config(NMSparsityConfig, NMSparsityConfig(pattern="1:4"), {"max_steps": 10}, "sparsify")
    assert (cfg.pattern, cfg.max_steps) == ("1:4", 10)
    with pytest.raises(ConfigError, match="unknown key 'patern'; valid keys: .*pattern"):
        as_config(NMSparsityConfig, None, {"patern": "2:4"}, "sparsify")
    with pytest.raises(ConfigError, match="method"):
        as_config(NMSparsityConfig, {"method": "magic"}, {}, "sparsify")
    (tmp_path / "c.yaml").write_text("pattern: '2:8'\n")
    assert as_config(NMSparsityConfig, tmp_path / "c.yaml", {}, "sparsify").pattern == "2:8"


def test_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    """``pip install .`` puts nothing but ``edgecompress`` into site-packages."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)  # fmt: skip
    import zipfile

    (wheel,) = tmp_path.glob("edgecompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgecompress", next(t for t in tops if t.endswith(".dist-info"))}
    for path in ("edgecompress/export/tvm/tuned/llvm-x86_64-linux-gnu-haswell-2c/database_tuning_record.json",
                 "edgecompress/compress/ptq/seed_trials.sqlite", "edgecompress/compress/api/deploy.py",
                 "edgecompress/targets/py.typed"):  # fmt: skip
        assert path in names
    packaged = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    folders = {"edgecompress." + str(p.parent.relative_to(ROOT)).replace("/", ".")
               for f in ("compress", "export", "runtimes", "targets") for p in (ROOT / f).rglob("__init__.py")}
    assert folders <= packaged, f"add to pyproject's packages: {sorted(folders - packaged)}"
