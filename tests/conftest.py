"""Shared fixtures: an isolated cache, the built-in MNIST splits and small trained example models.

Training is short (a few seconds) and happens once per test session; tests that need the fully
trained demo model use ``example_checkpoint`` through the session cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the toolchain's cache at a per-session folder (unless the caller set one)."""
    if "EDGECOMPRESS_CACHE" not in os.environ:
        os.environ["EDGECOMPRESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    import torch

    torch.set_num_threads(2)
    return Path(os.environ["EDGECOMPRESS_CACHE"])


@pytest.fixture(scope="session")
def mnist_splits():
    from edgecompress.compress.data import load_splits

    return load_splits("mnist")


def _train(name: str, steps: int, folder: Path) -> Path:
    from edgecompress.compress.examples import train_example

    return train_example(name, folder, steps=steps, seed=0)


@pytest.fixture(scope="session")
def cnn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example CNN trained for 300 steps (~96% test accuracy, ~6 s)."""
    return _train("cnn", 300, tmp_path_factory.mktemp("cnn"))


@pytest.fixture(scope="session")
def cnn_onnx(cnn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained example CNN exported to ONNX (the Quantune tests' input)."""
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.export import export_onnx

    b = load_checkpoint(cnn_checkpoint)
    art = export_onnx(b.module, b.input_shape, tmp_path_factory.mktemp("onnx") / "a", model_name="cnn",
                      preprocessing=b.preprocessing)  # fmt: skip
    return art.model_path


@pytest.fixture(scope="session")
def untrained_cnn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example CNN with seeded random weights, for tests where training does not matter
    (compiling, timing, RPC)."""
    import torch

    from edgecompress.compress.checkpoint import ModelBundle, save_checkpoint
    from edgecompress.compress.models import create_model

    torch.manual_seed(0)
    bundle = ModelBundle(create_model("cnn", num_classes=10, in_chans=1).eval(), "cnn", (1, 28, 28), {}, 10, {})
    return save_checkpoint(bundle, tmp_path_factory.mktemp("untrained") / "cnn.pt", model_kwargs={"num_classes": 10})


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory fixture: ``trained_checkpoint("vit", steps=200)`` trains once per (name, steps)."""
    made: dict[tuple[str, int], Path] = {}

    def get(name: str, steps: int = 200) -> Path:
        if (name, steps) not in made:
            made[(name, steps)] = _train(name, steps, tmp_path_factory.mktemp(f"{name}{steps}"))
        return made[(name, steps)]

    return get


@pytest.fixture()
def cli(capsys: pytest.CaptureFixture[str]):
    """Run the CLI in-process: ``code, out, err = cli("export", ...)``."""
    from edgecompress.compress.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def shipped_tuned() -> bool | str:
    """What ``extra["tuned"]`` must say for an example model on this host with the shipped records
    alone: True where the host's key is the shipped one, "transferred" on any other x86-64 CPU
    that runs the shipped CPU's code (an AVX-512 host, another core count)."""
    from edgecompress.export.tvm.records import SHIPPED_DIR, database_key, folder_target, transfer_rank
    from edgecompress.targets import get_target

    host = dict(get_target("x86-64").tvm)
    # A folder tuned for some models only (its models.json says which) does not hold the examples' records.
    examples = [f for f in SHIPPED_DIR.iterdir() if not (f / "models.json").is_file()
                or "cnn" in json.loads((f / "models.json").read_text())]  # fmt: skip
    ranks = [transfer_rank(spec, host) for f in examples if (spec := folder_target(f)) is not None]
    usable = [r for r in ranks if r is not None]
    if not usable:
        pytest.skip(f"no shipped database runs on this CPU ({database_key(host)})")
    return True if min(usable) == 0 else "transferred"
