"""Models with any inputs and outputs: named multi-input models, int64 token ids, dict outputs,
dynamic dims, data with explicit roles and label-free metrics, through the library and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgecompress.compress.checkpoint import ModelBundle, load_checkpoint, save_checkpoint
from edgecompress.compress.models.registry import register_model
from edgecompress.export.errors import SpecError
from edgecompress.export.spec import ModelSpec, parse_input_option

VOCAB, SEQ = 50, 12


class TinyTokenEncoder(nn.Module):
    """Token ids + mask -> mean-pooled embedding (the shape of a sentence encoder)."""

    def __init__(self, **_: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class TwoHeads(nn.Module):
    """An image model returning a dict: logits and an embedding."""

    def __init__(self, **_: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = torch.relu(self.conv(x)).mean((2, 3))
        return {"logits": self.fc(e), "embedding": e}


@pytest.fixture(scope="module", autouse=True)
def _test_models():
    """The test models are registered while this module runs only: registry-driven tests elsewhere
    are parametrized over the built-in models."""
    from edgecompress.compress.models.registry import unregister_model

    register_model("test-token-encoder", "test: token ids + mask", task="embedding", inputs=[
        {"name": "input_ids", "shape": ["batch", SEQ], "dtype": "int64", "range": [0, VOCAB]},
        {"name": "attention_mask", "shape": ["batch", SEQ], "dtype": "int64", "range": [0, 2]},
    ])(TinyTokenEncoder)  # fmt: skip
    register_model("test-two-heads", "test: dict outputs", inputs=[
        {"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}])(TwoHeads)  # fmt: skip
    yield
    unregister_model("test-token-encoder")
    unregister_model("test-two-heads")


def _tokens(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(n, SEQ)).astype(np.int64)
    lengths = rng.integers(3, SEQ + 1, size=n)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("enc")
    bundle = load_checkpoint_free("test-token-encoder")
    return save_checkpoint(bundle, folder / "enc.pt")


def load_checkpoint_free(name: str) -> ModelBundle:
    from edgecompress.compress.models import builtin_model_spec, create_model

    return ModelBundle(create_model(name).eval(), name, spec=builtin_model_spec(name))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tokens.npz"
    np.savez(path, **_tokens(37, 1))
    return path


def test_input_option_parsing() -> None:
    spec = parse_input_option("input_ids:32:int64")
    assert spec.name == "input_ids" and spec.shape == ["batch", 32] and spec.dtype == "int64"
    assert parse_input_option("x:3x224x224").shape == ["batch", 3, 224, 224]
    assert parse_input_option("image:3xHxW").shape == ["batch", 3, "H", "W"]
    assert parse_input_option("x:3x8x8:uint8").dtype == "uint8"
    with pytest.raises(SpecError, match="unknown dtype 'int65'"):
        parse_input_option("x:3:int65")
    with pytest.raises(SpecError, match="NAME:SHAPE"):
        parse_input_option("3x224x224")


def test_spec_match_names_the_mismatch() -> None:
    spec = ModelSpec.from_json({"inputs": [{"name": "input_ids", "shape": ["batch", 4], "dtype": "int64"},
                                           {"name": "attention_mask", "shape": ["batch", 4], "dtype": "int64"}]})
    good = {"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int64)}
    feeds = spec.match(good)
    assert feeds["input_ids"].dtype == np.int64  # int32 data is widened to the input's int64
    with pytest.raises(SpecError, match="missing: \\['attention_mask'\\]"):
        spec.match({"input_ids": good["input_ids"], "y": np.zeros(2)})
    with pytest.raises(SpecError, match="dim 1 is 5, expected 4"):
        spec.match({**good, "attention_mask": np.ones((2, 5), np.int64)})
    with pytest.raises(SpecError, match="is float32 but the model's input 'input_ids' is int64"):
        spec.match({**good, "input_ids": np.zeros((2, 4), np.float32)})
    with pytest.raises(SpecError, match="dynamic dim 'H'"):
        ModelSpec([parse_input_option("x:3xHxW")]).example_feeds(1)


def test_checkpoint_records_inputs_and_outputs(encoder_ckpt: Path) -> None:
    bundle = load_checkpoint(encoder_ckpt)
    assert bundle.spec.input_names == ["input_ids", "attention_mask"]
    assert [i.dtype for i in bundle.spec.inputs] == ["int64", "int64"]
    assert bundle.spec.outputs[0].shape == ["batch", 16]
    with pytest.raises(Exception, match="--input-shape describes one float input"):
        load_checkpoint(encoder_ckpt, input_shape=(12,))


def test_multi_input_export_check_cosine_and_all_samples(encoder_ckpt: Path, tokens: Path, tmp_path: Path,
                                                         cli) -> None:  # fmt: skip
    art = tmp_path / "art"
    code, out, err = cli("export", encoder_ckpt, "--input", f"input_ids:{SEQ}:int64", "--input",
                         f"attention_mask:{SEQ}:int64", "--format", "onnx", "-o", art, "--json")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((art / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert [i["dtype"] for i in manifest["inputs"]] == ["int64", "int64"]
    code, out, err = cli("check", art, "--eval-data", tokens, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["samples"] == 37 and res["metric"] == "cosine"  # unlabelled embeddings -> cosine; every sample
    ort_row = res["rows"][1]
    assert ort_row["runtime"] == "onnxruntime" and ort_row["cosine"] > 0.9999 and ort_row["sqnr_db"] > 60
    code, out, err = cli("check", art, "--eval-data", tokens, "--metric", "top1", "--json")
    assert code == 2 and "needs labels" in err


def test_data_that_does_not_fit_is_exit_2(encoder_ckpt: Path, tmp_path: Path, cli) -> None:
    art = tmp_path / "art"
    assert cli("export", encoder_ckpt, "-o", art, "--json")[0] == 0  # the checkpoint's recorded inputs
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.zeros((4, SEQ), np.int64), mask=np.ones((4, SEQ), np.int64))
    code, _, err = cli("check", art, "--eval-data", bad)
    assert code == 2 and "attention_mask" in err and "mask" in err
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{k: v[:, :5] for k, v in _tokens(4, 0).items()})
    code, _, err = cli("check", art, "--eval-data", wrong)
    assert code == 2 and "expected 12" in err


def test_dict_outputs_are_named_and_all_compared(tmp_path: Path, cli) -> None:
    bundle = load_checkpoint_free("test-two-heads")
    ckpt = save_checkpoint(bundle, tmp_path / "heads.pt")
    art = tmp_path / "art"
    code, out, err = cli("export", ckpt, "-o", art, "--json")
    assert code == 0, err
    manifest = json.loads((art / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "embedding"]
    data = tmp_path / "img.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((20, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 20))
    code, out, err = cli("check", art, "--eval-data", data, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["metric"] == "top1" and res["samples"] == 20
    assert res["rows"][1]["top1_agreement"] == 100.0 and res["rows"][1]["sqnr_db"] > 60


def test_metrics_on_known_outputs() -> None:
    from edgecompress.runtimes.measure import default_metric, score

    ref = [np.array([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])]
    out = [np.array([[1.0, 2.0], [0.0, 1.0], [1.0, 0.0]])]
    assert score("agreement", out, reference=ref) == pytest.approx(200 / 3)
    assert score("top1", out, labels=np.array([1, 1, 0])) == 100.0
    cos = score("cosine", out, reference=ref)
    assert cos == pytest.approx(100 * (0.8 + 1 + 1) / 3)  # cos([2,1],[1,2]) = 4/5
    assert score("sqnr", ref, reference=ref) == float("inf")
    assert default_metric(True, ref) == "top1" and default_metric(False, ref) == "agreement"
    assert default_metric(False, [np.zeros((3, 1, 4, 4))]) == "cosine"


def test_data_roles_are_reported_and_never_overlap(tmp_path: Path) -> None:
    from edgecompress.compress.data import load_data
    from edgecompress.compress.errors import DataError

    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, **_tokens(30, 0))
    np.savez(b, **_tokens(11, 1))
    splits = load_data(calib_data=a, eval_data=b)
    usage = splits.usage()
    assert usage["calib"]["samples"] == 30 and usage["test"]["samples"] == 11 and usage["val"]["source"].endswith("b.npz")
    assert splits.test.y is None
    with pytest.raises(DataError, match="same samples"):
        load_data(calib_data=a, eval_data=a)
    with pytest.raises(DataError, match="add --eval-data"):
        load_data(calib_data=a)
    with pytest.raises(DataError, match="no data given"):
        load_data()


def test_distillation_trains_an_unlabelled_model() -> None:
    """Training without labels distils from the teacher: the student moves towards it."""
    from edgecompress.compress.data import Dataset
    from edgecompress.compress.training import TrainConfig, Trainer, evaluate_accuracy

    torch.manual_seed(0)
    teacher = TinyTokenEncoder().eval()
    student = TinyTokenEncoder()
    ds = Dataset(_tokens(64, 3), None, "tokens")
    before = evaluate_accuracy(student, ds, teacher=teacher, task="embedding")
    cfg = TrainConfig(max_steps=60, batch_size=16, lr=1e-2, eval_every=1000, checkpoint_every=1000)
    Trainer(student, ds, None, cfg, teacher=teacher, task="embedding").fit()
    after = evaluate_accuracy(student, ds, teacher=teacher, task="embedding")
    assert after > before + 50 and after > 75  # 100 x mean cosine with the teacher (-15 -> 81 measured)
    with pytest.raises(Exception, match="no labels"):
        Trainer(student, ds, None, cfg)


@pytest.fixture(scope="module")
def dynamic_hw_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fully convolutional ONNX model with dynamic batch, height and width (a detector/OCR-like map)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 2, 1)).eval()  # fmt: skip
    path = tmp_path_factory.mktemp("dyn") / "fcn.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["heatmap"],
                      dynamic_axes={"x": {0: "batch", 2: "H", 3: "W"}, "heatmap": {0: "batch", 2: "H", 3: "W"}})  # fmt: skip
    return path


def test_dynamic_hw_onnx_quantizes_with_sqnr_and_exports_to_tvm(dynamic_hw_onnx: Path, tmp_path: Path, cli) -> None:
    rng = np.random.default_rng(0)
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=rng.standard_normal((16, 3, 48, 48)).astype(np.float32))
    np.savez(evald, x=rng.standard_normal((12, 3, 48, 48)).astype(np.float32))
    code, out, err = cli("quantize", dynamic_hw_onnx, "--calib-data", calib, "--eval-data", evald, "--metric", "sqnr",
                         "--search", "none", "--no-sensitivity", "-o", tmp_path / "q", "--json")  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["metric"] == "sqnr" and res["val_samples"] == 12 and res["calib_samples"] == 16
    assert 10 < res["val_accuracy"] < 80  # int8 noise in dB, finite
    # TVM needs the dims: without --input the error names the dynamic dim and the fix
    code, _, err = cli("export", dynamic_hw_onnx, "--format", "tvm", "-o", tmp_path / "t0")
    assert code == 2 and "dynamic dim 'H'" in err and "--input x:3xNxN" in err
    code, out, err = cli("export", dynamic_hw_onnx, "--format", "tvm", "--input", "x:3x64x64", "-o", tmp_path / "t",
                         "--json")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert manifest["metrics"]["export_check"]["sqnr_db"] > 40


def test_codebook_on_a_token_model_without_labels(encoder_ckpt: Path, tmp_path: Path, cli) -> None:
    """JLCM calibrates on every input of a multi-input model, distils an embedding end to end by
    MSE + cosine (not a softmax over embedding dims) and is scored by cosine on both runtimes."""
    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, **_tokens(48, 5))
    np.savez(val, **_tokens(24, 6))
    code, out, err = cli("codebook", encoder_ckpt, "--calib-data", calib, "--eval-data", val, "--bits", "4",
                         "--groups", "2", "--steps", "20", "--e2e-steps", "10", "--no-memory", "-o",
                         tmp_path / "cb", "--json")  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert res["metric"] == "cosine" and res["samples"] == 24
    assert res["accuracy"] > 95 and abs(res["onnxruntime_accuracy"] - res["accuracy"]) < 0.5
    report = json.loads((tmp_path / "cb" / "codebook_report.json").read_text())
    assert report["e2e_loss"] is not None and 0 <= report["e2e_loss"] < 0.5


def test_jlcm_distillation_of_embeddings_is_not_a_softmax() -> None:
    """The end-to-end loss of an embedding model is zero when student == teacher and grows when the
    student's features are scaled (the old softmax-over-features KL barely saw such a change)."""
    from edgecompress.compress.training import distillation_loss

    t = torch.randn(8, 16)
    assert float(distillation_loss(t.clone(), [t], 1.0, logits=False)) < 1e-6
    assert float(distillation_loss(t * 3, [t], 1.0, logits=False)) > 1.0


def test_recipe_on_a_token_model_with_data_roles_and_a_metric(encoder_ckpt: Path, tmp_path: Path, cli) -> None:
    """A recipe names the model's inputs, calibration and evaluation files and the metric; the
    Quantune stage optimises that metric and the export's check reports it on every eval sample."""
    import yaml

    calib, val = tmp_path / "calib.npz", tmp_path / "val.npz"
    np.savez(calib, **_tokens(40, 7))
    np.savez(val, **_tokens(21, 8))
    recipe = {"version": 1, "name": "tokens",
              "model": {"checkpoint": str(encoder_ckpt),
                        "inputs": [f"input_ids:{SEQ}:int64", f"attention_mask:{SEQ}:int64"]},
              "data": None, "calib_data": str(calib), "eval_data": str(val), "metric": "sqnr",
              "targets": ["x86-64"], "stages": [{"ptq": {"search": "random", "budget_trials": 2, "sensitivity": False}}],
              "gates": {"x86-64": {"max_accuracy_drop": None, "max_latency_ms": None, "max_size_mb": None}},
              "profile": {"batch": 1, "min_runs": 3, "min_seconds": 0.05}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = cli("run", path, "-o", tmp_path / "run")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stages"][0]["metrics"]["metric"] == "sqnr"
    result = summary["results"][0]
    assert result["metrics"]["metric"] == "sqnr" and result["metrics"]["accuracy"] > 10  # dB vs fp32
    assert summary["samples"]["test"]["samples"] == 21 and summary["samples"]["calib"]["samples"] == 40
    bad = {**recipe, "model": {**recipe["model"], "inputs": ["input_ids:12:int65"]}}
    path.write_text(yaml.safe_dump(bad))
    code, out, err = cli("run", path, "-o", tmp_path / "run2")
    assert code == 2 and "int65" in err


class RawPixels(nn.Module):
    """A model that takes raw uint8 pixels and normalises them itself (as many mobile models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float() / 255.0
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_uint8_input_model_gets_raw_pixels(tmp_path: Path, cli) -> None:
    """A uint8 input stays uint8 (it was recorded as int32 before) and is fed the stored pixels,
    not the 1/255-scaled floats the loader makes for float models."""
    torch.manual_seed(0)
    path = tmp_path / "raw.onnx"
    torch.onnx.export(RawPixels().eval(), (torch.zeros(1, 3, 16, 16, dtype=torch.uint8),), str(path), dynamo=False,
                      opset_version=17, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    spec = ModelSpec.from_onnx(__import__("onnx").load(str(path)))
    assert spec.inputs[0].dtype == "uint8"
    rng = np.random.default_rng(0)
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, x=rng.integers(0, 256, (16, 3, 16, 16)).astype(np.uint8))
    np.savez(evald, x=rng.integers(0, 256, (12, 3, 16, 16)).astype(np.uint8))
    from edgecompress.compress.data import load_dataset

    fed = load_dataset(evald).feeds(spec)["image"]
    assert fed.dtype == np.uint8 and fed.max() > 200  # the pixels as stored
    code, out, err = cli("quantize", path, "--calib-data", calib, "--eval-data", evald, "--metric", "sqnr",
                         "--search", "none", "--no-sensitivity", "--min-sqnr", "10", "-o", tmp_path / "q", "--json")  # fmt: skip
    assert code == 0, err
    code, out, err = cli("export", path, "--format", "tvm", "-o", tmp_path / "t", "--json")
    assert code == 0, err
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["inputs"][0]["dtype"] == "uint8" and manifest["metrics"]["export_check"]["sqnr_db"] > 40
