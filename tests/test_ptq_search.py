"""Quantune PTQ: strategies, budgets, failures and errors on a tiny trained CNN and the tiny space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecompress.compress.errors import ConfigError, DataError
from edgecompress.compress.ptq.config import PTQConfig, space_preset
from edgecompress.compress.ptq.evaluator import TrialResult
from edgecompress.compress.ptq.space import enumerate_space


@pytest.fixture(scope="module")
def fp32_artifact(cnn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from edgecompress.compress.checkpoint import load_checkpoint
    from edgecompress.export import export_onnx

    b = load_checkpoint(cnn_checkpoint)
    return export_onnx(b.module, b.input_shape, tmp_path_factory.mktemp("fp32") / "a", model_name="cnn",
                       preprocessing=b.preprocessing)  # fmt: skip


@pytest.fixture(scope="module")
def evaluator(fp32_artifact, mnist_splits, tmp_path_factory: pytest.TempPathFactory):
    from edgecompress.compress.ptq.database import TuningDatabase
    from edgecompress.compress.ptq.evaluator import Evaluator
    from edgecompress.compress.ptq.ort_backend import prepare_model

    tmp = tmp_path_factory.mktemp("ptq")
    prepared = prepare_model(fp32_artifact.model_path, tmp / "models")
    return Evaluator(prepared, mnist_splits.calib.x, mnist_splits.val.x[:200], mnist_splits.val.y[:200],
                     database=TuningDatabase(tmp / "db.sqlite"), workdir=tmp / "work")  # fmt: skip


@pytest.mark.parametrize("name", ["grid", "random", "genetic", "quantune"])
def test_each_strategy_measures_distinct_configs_and_keeps_the_best(name: str, evaluator) -> None:
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import make_strategy

    space = enumerate_space(space_preset("tiny"))
    strat = make_strategy(name, space, seed=1, descriptors={"convs": 2.0}, fp32_accuracy=evaluator.fp32_accuracy)
    res = run_search(strat, evaluator, budget_trials=5)
    keys = [t.config.key() for t in res.trials]
    assert len(keys) == 5 and len(set(keys)) == 5
    assert res.stopped_by == "trial budget"
    assert res.best is not None and res.best.accuracy == max(t.accuracy or 0.0 for t in res.trials)
    if name == "grid":
        assert keys == [c.key() for c in space[:5]]


def test_trained_cnn_int8_is_close_to_fp32_and_distribution_calibration_loses(evaluator) -> None:
    good = evaluator.evaluate(PTQConfig(calibration="minmax", calib_size=16, per_channel=True))
    assert good.ok and good.accuracy is not None
    assert good.accuracy >= evaluator.fp32_accuracy - 2.0
    assert good.sqnr_db is not None and good.sqnr_db > 15
    cliff = evaluator.evaluate(PTQConfig(calibration="distribution", calib_size=16, per_channel=True))
    # onnxruntime's distribution calibrator on 16 samples clips this CNN's activations: 90 % vs 97 %
    assert cliff.ok and cliff.accuracy is not None and cliff.accuracy <= good.accuracy - 4.0
    again = evaluator.evaluate(PTQConfig(calibration="minmax", calib_size=16, per_channel=True))
    assert again.accuracy == good.accuracy  # served from the cache, never paid twice
    measured = evaluator.measured
    evaluator.evaluate(PTQConfig(calibration="minmax", calib_size=16, per_channel=True))
    assert evaluator.measured == measured


def test_random_search_is_seeded() -> None:
    from edgecompress.compress.ptq.strategies import RandomSearch

    space = enumerate_space(space_preset("bench"))
    a = [c.key() for c in RandomSearch(space, seed=3).propose(10)]
    b = [c.key() for c in RandomSearch(space, seed=3).propose(10)]
    c = [c.key() for c in RandomSearch(space, seed=4).propose(10)]
    assert a == b and a != c


class _FakeEvaluator:
    """Accuracy from a formula; each evaluation advances a fake clock by 10 s."""

    def __init__(self, clock: list[float]):
        self.clock = clock
        self.recorded: list[TrialResult] = []

    def lookup(self, config):
        return None

    def task(self, config):
        return config

    def trial_fn(self, c):
        self.clock[0] += 10.0
        acc = 90.0 + (5.0 if c.per_channel else 0.0) - (80.0 if c.calibration == "distribution" else 0.0)
        return TrialResult(c, acc, seconds=10.0)

    def record(self, config, result):
        self.recorded.append(result)


def test_time_budget_is_honoured_and_best_kept() -> None:
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import GridSearch

    clock = [0.0]
    space = enumerate_space(space_preset("bench"))
    res = run_search(GridSearch(space), _FakeEvaluator(clock), budget_time_s=35.0, clock=lambda: clock[0])
    assert res.stopped_by == "time budget"
    assert len(res.trials) == 4  # 10, 20, 30 s < 35 s go on; 40 s stops
    assert res.best is not None and res.best.accuracy == max(t.accuracy for t in res.trials)


def test_target_accuracy_stops_the_search() -> None:
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import GridSearch

    space = enumerate_space(space_preset("bench"))
    res = run_search(GridSearch(space), _FakeEvaluator([0.0]), target_accuracy=94.0)
    assert res.stopped_by == "target accuracy" and res.best is not None and res.best.accuracy >= 94.0
    assert len(res.trials) < len(space)


def test_failing_trial_is_recorded_and_search_goes_on(evaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecompress.compress.ptq import ort_backend as backend
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import GridSearch

    real = backend.quantize_to_file

    def flaky(prepared, config, *a, **k):
        if config.activation_symmetric:
            raise ValueError("quantizer rejects this combination")
        return real(prepared, config, *a, **k)

    monkeypatch.setattr(backend, "quantize_to_file", flaky)
    cfgs = [PTQConfig(calibration="minmax", calib_size=8, activation_symmetric=s, weight_symmetric=False) for s in (True, False)]
    res = run_search(GridSearch(cfgs), evaluator)
    assert [t.ok for t in res.trials] == [False, True]
    assert "quantizer rejects" in (res.trials[0].error or "")
    assert res.best is res.trials[1]
    stored = evaluator.database.get_trial(evaluator.prepared.model_hash, evaluator.data_hash, cfgs[0].key())
    assert stored is not None and stored.accuracy is None and "quantizer rejects" in stored.error


def test_programming_errors_are_not_turned_into_failed_trials(evaluator, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecompress.compress.ptq import ort_backend as backend

    def broken(*a, **k):
        raise TypeError("a bug")

    monkeypatch.setattr(backend, "quantize_to_file", broken)
    with pytest.raises(TypeError, match="a bug"):
        evaluator.evaluate(PTQConfig(calibration="minmax", calib_size=3))


def test_mixed_precision_keeps_first_and_last_layers_in_float(evaluator) -> None:
    import onnx

    from edgecompress.compress.ptq.ort_backend import excluded_nodes, quantize_to_file

    cfg = PTQConfig(calibration="minmax", calib_size=16, keep_float="first_last")
    names = excluded_nodes(evaluator.prepared, cfg, None)
    assert names == sorted({evaluator.prepared.weighted_nodes[0], evaluator.prepared.weighted_nodes[-1]})
    out = evaluator.workdir / "mixed.onnx"
    quantize_to_file(evaluator.prepared, cfg, evaluator_calib(evaluator), out, evaluator.calib_cache, nodes_to_exclude=names)
    graph = onnx.load(str(out)).graph
    first = next(n for n in graph.node if n.name == evaluator.prepared.weighted_nodes[0])
    mid = next(n for n in graph.node if n.name == evaluator.prepared.weighted_nodes[1])
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(first.input[1]) != "DequantizeLinear"  # float weight
    assert producers.get(mid.input[1]) == "DequantizeLinear"  # int8 weight


def evaluator_calib(evaluator) -> dict[str, np.ndarray]:
    from edgecompress.compress.ptq.evaluator import load_feeds

    return load_feeds(evaluator.arrays / "calib.npz")


def test_empty_calibration_set_is_a_clear_error(evaluator, tmp_path: Path) -> None:
    from edgecompress.compress.ptq.evaluator import Evaluator

    with pytest.raises(DataError, match="calibration set is empty"):
        calib = evaluator_calib(evaluator)
        Evaluator(evaluator.prepared, {k: v[:0] for k, v in calib.items()}, {k: v[:4] for k, v in calib.items()},
                  np.zeros(4, np.int64), database=None, workdir=tmp_path)  # fmt: skip


def test_corrupt_onnx_is_a_clear_error(tmp_path: Path) -> None:
    from edgecompress.compress.ptq.ort_backend import prepare_model

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model\xff\xff")
    with pytest.raises(ConfigError, match="not a valid ONNX model"):
        prepare_model(bad, tmp_path / "cache")


def test_config_errors_name_the_bad_value() -> None:
    from pydantic import ValidationError

    from edgecompress.compress.ptq.config import parse_duration

    with pytest.raises(ConfigError, match="unknown search space 'huge'; valid: tiny, bench"):
        space_preset("huge")
    with pytest.raises(ValidationError, match="keep_float_k"):
        PTQConfig(keep_float="sensitive")
    with pytest.raises(ValidationError, match="extra"):
        PTQConfig(calibraton="minmax")  # type: ignore[call-arg]
    assert parse_duration("10m") == 600.0 and parse_duration("90s") == 90.0 and parse_duration(None) is None
    with pytest.raises(ConfigError, match="10 minutes"):
        parse_duration("10 minutes")


def test_space_round_trip_and_sizes() -> None:
    from edgecompress.compress.ptq.space import point_of

    space = enumerate_space(space_preset("full"))
    # calibrations x sizes x pc x aS x wS x reduce_range x int8/int4 x 6 float-layer choices x op sets x 4-bit MatMuls
    # x 8/16-bit activations
    assert len(space) == 6 * 3 * 2 * 2 * 2 * 2 * 2 * 6 * 2 * 2 * 2
    assert len({c.key() for c in space}) == len(space)
    assert len(enumerate_space(space_preset("bench"))) == 80
    c = next(c for c in space if c.keep_float == "sensitive" and c.calibration == "percentile")
    assert point_of(c)["keep_float"] == "sensitive2" and point_of(c)["calibration"].startswith("percentile")


def test_quantize_and_ptq_imports_stay_lean() -> None:
    import subprocess
    import sys

    code = ("import sys, compress.ptq, compress.ptq.config, compress.cli.quantize_cmd; "
            "print(sorted(m for m in ('onnxruntime', 'xgboost', 'torch', 'onnx') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_sensitive_mixed_precision_leaves_the_top_k_layers_in_float(evaluator) -> None:
    nodes = evaluator.prepared.weighted_nodes
    cfg = PTQConfig(calibration="minmax", calib_size=16, keep_float="sensitive", keep_float_k=2)
    try:
        evaluator.set_sensitivity_source(None)
        with pytest.raises(ConfigError, match="sensitivity ranking"):
            evaluator.task(cfg)
        evaluator.set_sensitivity_source(lambda: [nodes[2], nodes[0], nodes[1]])
        assert evaluator.task(cfg).exclude == tuple(sorted([nodes[2], nodes[0]]))
    finally:
        evaluator.set_sensitivity_source(None)


def test_histogram_calibration_works_when_batches_do_not_divide_the_set(evaluator) -> None:
    from edgecompress.compress.ptq.ort_backend import calibration_batch_size

    assert calibration_batch_size(100) == 50 and calibration_batch_size(500) == 50 and calibration_batch_size(7) == 7
    assert calibration_batch_size(97) == 1 and calibration_batch_size(128) == 64
    r = evaluator.evaluate(PTQConfig(calibration="entropy", calib_size=100, per_channel=True))
    assert r.ok, r.error  # onnxruntime's histogram collector fails on a short last batch of 36 with batch 64


def test_a_trial_whose_worker_was_lost_is_never_cached(evaluator) -> None:
    from edgecompress.compress.ptq.evaluator import LOST

    lost = PTQConfig(calibration="minmax", calib_size=8, per_channel=False)
    evaluator.record(lost, TrialResult(lost, None, error="worker lost (retried once): WorkerCrashedError", extra={LOST: True}))
    assert evaluator.database.get_trial(evaluator.prepared.model_hash, evaluator.data_hash, lost.key()) is None
    failed = PTQConfig(calibration="minmax", calib_size=8, per_channel=True)
    evaluator.record(failed, TrialResult(failed, None, error="quantizer rejects it"))  # the config's own failure
    assert evaluator.database.get_trial(evaluator.prepared.model_hash, evaluator.data_hash, failed.key()) is not None


class _ShuffledExecutor:
    """Three trials in flight; ``wait`` finishes them newest first (as a busy cluster might) and
    advances the fake clock by 10 s per result."""

    workers = 3
    where = "a fake cluster"

    def __init__(self, clock: list[float], newest_first: bool = True):
        self.clock, self.newest_first = clock, newest_first
        self.queue: list[tuple[int, object, object]] = []
        self.cancelled = 0
        self.n = 0

    def submit(self, fn, task):
        self.n += 1
        self.queue.append((self.n, fn, task))
        return self.n

    def wait(self, timeout=None):
        if not self.queue:
            return []
        ticket, fn, task = self.queue.pop(-1 if self.newest_first else 0)
        return [(ticket, fn(task))]

    def cancel(self):
        self.cancelled += len(self.queue)
        self.queue.clear()

    def close(self):
        pass


def test_completion_order_does_not_change_what_a_seeded_search_proposes() -> None:
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import make_strategy

    space = enumerate_space(space_preset("bench"))
    runs = []
    for newest_first in (True, False):
        clock = [0.0]
        strategy = make_strategy("quantune", space, seed=2, descriptors={"convs": 3.0}, fp32_accuracy=95.0, rounds=20)
        res = run_search(strategy, _FakeEvaluator(clock), budget_trials=9, executor=_ShuffledExecutor(clock, newest_first))
        assert res.best is not None
        runs.append(([t.config.key() for t in res.trials], res.best.config.key()))  # ties broken by proposal order
        assert res.stopped_by == "trial budget" and len(res.trials) == 9
    assert runs[0] == runs[1]


def test_a_time_budget_that_ends_mid_flight_cancels_the_rest_and_keeps_the_best() -> None:
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import GridSearch

    clock = [0.0]
    space = enumerate_space(space_preset("bench"))
    ex = _ShuffledExecutor(clock)
    evaluator = _FakeEvaluator(clock)
    res = run_search(GridSearch(space), evaluator, budget_time_s=35.0, executor=ex, clock=lambda: clock[0])
    # 0-2 finish at 10-30 s (newest first), 3-5 go out, 5 finishes at 40 s: the budget ends with 3 and 4 in flight
    assert res.stopped_by == "time budget" and ex.cancelled == 2
    assert [t.config.key() for t in res.trials] == [space[k].key() for k in (0, 1, 2, 5)]
    assert len(evaluator.recorded) == 4  # every finished trial is kept and recorded
    assert res.best is not None and res.best.accuracy == max(t.accuracy for t in res.trials)


def test_keep_float_depthwise_leaves_every_depthwise_conv_in_float(tmp_path: Path) -> None:
    """``keep_float: depthwise`` (in the default space): the depthwise convs stay float, the others are int8."""
    import onnx

    from edgecompress.compress.models import create_model
    from edgecompress.compress.ptq.ort_backend import excluded_nodes, prepare_model, quantize_to_file
    from edgecompress.export import export_onnx

    art = export_onnx(create_model("mobilenetv2").eval(), (1, 28, 28), tmp_path / "fp32", model_name="mobilenetv2")
    prepared = prepare_model(art.model_path, tmp_path / "cache")
    graph = onnx.load(str(prepared.path)).graph
    groups = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node if n.op_type == "Conv"}
    assert prepared.depthwise_nodes and set(prepared.depthwise_nodes) == {n for n, g in groups.items() if g > 1}
    config = PTQConfig(calibration="minmax", calib_size=8, per_channel=True, keep_float="depthwise")
    assert "depthwise" in space_preset("default").keep_float
    excluded = excluded_nodes(prepared, config, None)
    assert excluded == sorted(prepared.depthwise_nodes)
    calib = {prepared.input_names[0]: np.random.default_rng(0).normal(size=(8, 1, 28, 28)).astype(np.float32)}
    quantize_to_file(prepared, config, calib, tmp_path / "q.onnx", tmp_path / "calib", nodes_to_exclude=excluded)
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    dequantized = {n.output[0] for n in q.node if n.op_type == "DequantizeLinear"}
    convs = {n.name: n for n in q.node if n.op_type == "Conv"}
    floats = {i.name for i in q.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for name in prepared.depthwise_nodes:  # its weight stays a float initializer (its input may come through a DQ)
        assert convs[name].input[1] in floats and convs[name].input[1] not in dequantized, name
    others = [c for n, c in convs.items() if n not in prepared.depthwise_nodes]
    assert others and all(c.input[1] in dequantized for c in others)  # every other conv has int8 weights


def _matmul_model(path: Path) -> Path:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) -> Sigmoid: two constant-weight MatMuls and an activation."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "W1")
    w2 = numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["m"], name="mm2"), helper.make_node("Sigmoid", ["m"], ["y"], name="sigmoid")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], initializer=[w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path  # fmt: skip


def test_operator_set_and_4bit_matmuls_change_the_graph_as_configured(tmp_path: Path) -> None:
    """``op_types: weighted`` quantizes only Conv/MatMul/Gemm (the Sigmoid stays float); ``matmul_4bit``
    turns the constant-weight MatMuls into 4-bit MatMulNBits; both outputs stay close to fp32."""
    import onnx

    from edgecompress.compress.ptq.ort_backend import model_outputs, prepare_model, quantize_to_file
    from edgecompress.compress.ptq.space import applies_to

    prepared = prepare_model(_matmul_model(tmp_path / "mlp.onnx"), tmp_path / "cache")
    assert set(prepared.weight_matmuls) == {"mm1", "mm2"}
    calib = {"x": np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)}
    ref = model_outputs(prepared.path, calib)[0]

    def build(**kw: object) -> tuple[set[str], set[str], float]:
        out = tmp_path / f"q{len(kw)}{sorted(kw)}.onnx"
        quantize_to_file(prepared, PTQConfig(calibration="minmax", calib_size=32, **kw), calib, out, tmp_path / "calib")
        graph = onnx.load(str(out)).graph
        quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
        fed = {n.op_type for n in graph.node if n.op_type != "DequantizeLinear" and n.output[0] in quantized}
        got = model_outputs(out, calib)[0]
        return {n.op_type for n in graph.node}, fed, float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))

    _, fed_all, sqnr_all = build()
    _, fed_weighted, sqnr_weighted = build(op_types="weighted")
    # the ops whose output is quantized: the Sigmoid's only with op_types=all
    assert "Sigmoid" in fed_all and "Sigmoid" not in fed_weighted
    ops_4bit, _, sqnr_4bit = build(matmul_4bit=True, op_types="weighted")
    assert "MatMulNBits" in ops_4bit and "MatMul" not in ops_4bit
    assert min(sqnr_all, sqnr_weighted) > 25 and sqnr_4bit > 15
    assert applies_to(PTQConfig(matmul_4bit=True), prepared)
    assert not applies_to(PTQConfig(matmul_4bit=True), prepared.__class__(**{**prepared.__dict__, "weight_matmuls": ()}))
    assert not applies_to(PTQConfig(keep_float="depthwise"), prepared)  # no depthwise conv: same as "none"


def test_keep_float_slow_leaves_the_layers_timed_slower_in_int8_in_float(evaluator) -> None:
    """The per-layer profile maps onnxruntime's fused node names back to layers, and ``keep_float: slow``
    excludes exactly the layers found slower."""
    import onnx

    from edgecompress.compress.ptq.layer_speed import layer_aliases, layer_times

    model = onnx.load(str(evaluator.prepared.path))
    layers = evaluator.prepared.weighted_nodes
    aliases = layer_aliases(model, layers)
    first = next(n for n in model.graph.node if n.name == layers[0])
    act = next((n for n in model.graph.node if first.output[0] in n.input), None)
    profile = {f"{layers[0]}_token_7": 50.0, f"{first.output[0]}_nchwc": 20.0, "unrelated": 99.0}
    if act is not None and act.op_type in ("Relu", "Clip"):
        profile[f"{act.output[0]}_nchwc"] = 5.0  # a conv fused with its activation is named after the activation
    times = layer_times(profile, aliases)
    assert set(times) == {layers[0]} and times[layers[0]] == sum(v for k, v in profile.items() if k != "unrelated")
    evaluator.set_slow_source([layers[1]])
    task = evaluator.task(PTQConfig(calibration="minmax", calib_size=16, keep_float="slow"))
    assert task.exclude == (layers[1],)
    evaluator.set_slow_source(None)
    with pytest.raises(ConfigError, match="slow"):
        evaluator.task(PTQConfig(calibration="minmax", calib_size=16, keep_float="slow"))


def test_slow_layers_profiles_both_models_on_the_runtime(evaluator) -> None:
    """A real profile of the CNN: every weighted layer is timed in both models."""
    from edgecompress.compress.ptq.evaluator import load_feeds
    from edgecompress.compress.ptq.layer_speed import slow_layers
    from edgecompress.compress.ptq.ort_backend import quantize_to_file

    out = evaluator.workdir / "speed-int8.onnx"
    quantize_to_file(evaluator.prepared, PTQConfig(calibration="minmax", calib_size=16), evaluator_calib(evaluator), out,
                     evaluator.calib_cache)  # fmt: skip
    one = {k: v[:1] for k, v in load_feeds(evaluator.arrays / "val.npz").items()}
    slow, table = slow_layers(evaluator.prepared, out, one, ["CPUExecutionProvider"], 1)
    assert {r["node"] for r in table} == set(evaluator.prepared.weighted_nodes)
    assert all(r["float_us"] > 0 and r["int8_us"] > 0 for r in table)
    assert set(slow) == {r["node"] for r in table if r["int8_us"] > 1.05 * r["float_us"]}


def test_a_configuration_that_builds_the_same_model_is_not_measured_twice(evaluator) -> None:
    """``keep_float='slow'`` with no layer slower in int8 quantizes exactly what ``keep_float='none'`` does:
    the second is served from the first's result, marked as such."""
    from edgecompress.compress.ptq.search import run_search
    from edgecompress.compress.ptq.strategies import GridSearch

    base = PTQConfig(calibration="percentile", percentile=99.95, calib_size=16, per_channel=True)  # used nowhere else
    slow = base.model_copy(update={"keep_float": "slow"})
    first_last = base.model_copy(update={"keep_float": "first_last"})
    evaluator.set_slow_source([])
    before = evaluator.measured
    res = run_search(GridSearch([base, slow, first_last]), evaluator)
    by_label = {t.config.label(): t for t in res.trials}
    twin = by_label[slow.label()]
    assert twin.cached and twin.extra.get("same_model_as") == base.label()
    assert twin.accuracy == by_label[base.label()].accuracy
    assert not by_label[first_last.label()].extra.get("same_model_as")  # a different model is measured
    assert evaluator.measured - before == 2
    evaluator.set_slow_source(None)
