"""Quantune trials and TVM tuning builds on a real Ray cluster: two nodes on this machine, loopback only.

The cluster is Ray's own multi-node-on-one-machine harness (``ray.cluster_utils.Cluster``: a head
with its GCS and raylet, plus a second raylet as another node), started and stopped here. Ray binds
every interface unless it believes it is alone on the machine, so the environment flag that makes
it listen on 127.0.0.1 is set before anything starts, and the test checks that no Ray server
listens elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray  # the cluster extra, which `make install` installs: a missing one fails here, never skips


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head node and a second worker node, one CPU each, on 127.0.0.1; yields the address."""
    from ray.cluster_utils import Cluster

    old = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # ray may have been imported before the flag was set
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=60)
        yield cluster.address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old


@pytest.fixture(scope="module")
def cnn_source(cnn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.compress.exporting import import_onnx_file
    from edgecompress.export import export_onnx

    b = load_checkpoint(cnn_checkpoint)
    folder = tmp_path_factory.mktemp("cnn-onnx")
    art = export_onnx(b.module, b.input_shape, folder / "a", model_name="cnn", preprocessing=b.preprocessing)
    return import_onnx_file(art.model_path, folder / "src")


def _search(source, splits, tmp: Path, name: str, **options):
    from edgecompress.compress.ptq.config import QuantuneSearchConfig
    from edgecompress.compress.ptq.search import quantize_artifact

    cfg = QuantuneSearchConfig(search="quantune", space="tiny", budget_trials=6, sensitivity=False, val_samples=200, objective="accuracy",
                               seed=1, database=str(tmp / f"{name}.sqlite"), **options)  # fmt: skip
    return quantize_artifact(source, splits, cfg, tmp / name)


def _listening_elsewhere() -> list[str]:
    import psutil

    bad = []
    for c in psutil.net_connections(kind="inet"):
        if c.status != psutil.CONN_LISTEN or c.laddr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
            continue
        try:
            name = psutil.Process(c.pid).name() if c.pid else "?"
        except psutil.Error:
            continue
        if "ray" in name or name in ("gcs_server", "raylet"):
            bad.append(f"{name} on {c.laddr.ip}:{c.laddr.port}")
    return bad


def test_ray_search_gives_the_local_pool_result_on_a_loopback_cluster(ray_cluster: str, cnn_source, mnist_splits,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    local = _search(cnn_source, mnist_splits, tmp_path, "local", workers=2)
    remote = _search(cnn_source, mnist_splits, tmp_path, "ray", workers=2, executor="ray", ray_address=ray_cluster)
    assert [t.config.key() for t in remote.search.trials] == [t.config.key() for t in local.search.trials]
    assert [t.accuracy for t in remote.search.trials] == [t.accuracy for t in local.search.trials]
    assert remote.search.best is not None and local.search.best is not None
    assert remote.search.best.config.key() == local.search.best.config.key()
    assert remote.artifact.model_path.read_bytes() == local.artifact.model_path.read_bytes()  # the same int8 model
    ex = remote.search.extra["executor"]
    assert ex["kind"] == "ray" and ex["workers"] == 2 and ray_cluster in ex["where"] and "2 nodes" in ex["where"]
    assert _listening_elsewhere() == []


def test_a_worker_killed_mid_search_loses_no_result(ray_cluster: str, cnn_source, mnist_splits, tmp_path: Path) -> None:
    import psutil

    from edgecompress.compress.ptq.database import TuningDatabase

    done: dict[str, object] = {}

    def search() -> None:
        try:
            done["result"] = _search(cnn_source, mnist_splits, tmp_path, "killed", executor="ray", ray_address=ray_cluster)
        except BaseException as exc:  # reported by the main thread
            done["error"] = exc

    thread = threading.Thread(target=search)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        for p in psutil.process_iter(["name", "cmdline"]):
            title = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
            if title.startswith("ray::_trial_on_worker"):
                p.kill()
                killed = p.pid
                break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert "error" not in done, done.get("error")
    assert killed is not None, "no trial was seen running on a Ray worker"
    res = done["result"]
    trials = res.search.trials  # type: ignore[attr-defined]
    assert len(trials) == 6 and all(t.ok for t in trials), [t.error for t in trials]  # the killed trial was retried
    log = json.loads((res.artifact.path / "trials.json").read_text())  # type: ignore[attr-defined]
    stored = TuningDatabase(tmp_path / "killed.sqlite").trials(log["model_hash"])
    assert sorted(t.config_key for t in stored) == sorted(t.config.key() for t in trials)


def test_a_trial_whose_worker_dies_twice_is_a_failed_uncached_trial(ray_cluster: str) -> None:
    from edgecompress.compress.cluster import RayTrialExecutor
    from edgecompress.compress.ptq.config import PTQConfig
    from edgecompress.compress.ptq.evaluator import LOST

    def dies(config):  # defined here, so Ray ships it by value
        os._exit(1)

    ex = RayTrialExecutor(workers=1, address=ray_cluster)
    try:
        ex.submit(dies, PTQConfig())
        (_, r), = ex.wait(timeout=120)
    finally:
        ex.close()
    assert not r.ok and r.extra[LOST] and "worker lost (retried once)" in (r.error or "")


def test_tvm_tuning_candidates_build_on_ray(ray_cluster: str, tmp_path: Path) -> None:
    from test_tvm_tuning import _gemm_artifact

    from edgecompress.compress.exporting import export_model
    from edgecompress.targets import get_target

    art = export_model(_gemm_artifact(tmp_path / "g", 0), "tvm", get_target("x86-64"), tmp_path / "t", tune=2,
                       database_dir=tmp_path / "db", executor="ray", ray_address=ray_cluster)  # fmt: skip
    report = art.manifest.extra["tuning"]
    assert report["trials"] == 2 and report["tasks_tuned"] == 1 and ray_cluster in report["built_on"]
    assert art.manifest.extra["tuned"] is True


def test_without_the_cluster_extra_the_option_names_it(cli, cnn_source, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = cli("quantize", cnn_source.model_path, "--data", "mnist", "--executor", "ray", "-o", tmp_path / "q")
    assert code == 3 and "pip install -e '.[cluster]'" in err and not (tmp_path / "q").exists()
    code, _, err = cli("export", cnn_source.model_path, "--format", "tvm", "--tune", "2", "--executor", "ray",
                       "-o", tmp_path / "t")  # fmt: skip
    assert code == 3 and "cluster" in err and not (tmp_path / "t").exists()


def test_cluster_options_that_cannot_apply_are_refused(cli, cnn_source, tmp_path: Path) -> None:
    code, _, err = cli("export", cnn_source.model_path, "--format", "tvm", "--ray-address", "127.0.0.1:1", "-o", tmp_path / "t")
    assert code == 2 and "--executor ray" in err
    code, _, err = cli("export", cnn_source.model_path, "--format", "tvm", "--executor", "ray", "-o", tmp_path / "t")
    assert code == 2 and "--tune" in err
    code, _, err = cli("quantize", cnn_source.model_path, "--data", "mnist", "--executor", "spark", "-o", tmp_path / "q")
    assert code == 2 and "spark" in err
