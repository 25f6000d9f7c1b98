"""Every technique on every zoo architecture (tests/zoo.py), against the fp32 model on real data.

Registry-driven like timm's tests: each zoo model exercises one graph hazard (gates, depthwise and
grouped convs, shuffles, residual adds, concatenation, shared modules, fan-out, attention, layer
subclasses with their own forward, reflect padding, tuple outputs, modules defined out of order).
For each, JLCM's neuron grouping must keep the float function exactly, JLCM / W8A8 QAT must stay
near fp32 on the digits test split, oneshot 2:4 must keep its pattern, and ONNX export must verify.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from zoo import ZOO, logits_of, train_zoo_model

from edgecompress.compress.codebook.api import apply_jlcm, group_and_fold, select_layers
from edgecompress.compress.codebook.config import JLCMConfig
from edgecompress.export.torch_io import flatten_outputs
from edgecompress.export.verify import sqnr_db

NAMES = sorted(ZOO)
INPUT_SHAPE = (1, 28, 28)
HAZARDS = ("se_mobilenetv3", "depthwise_grouped", "channel_shuffle", "residual", "concat", "shared_module",
           "two_consumers", "attention", "conv_same_padding", "linear_subclass", "reflect_padding", "two_outputs")  # fmt: skip


@pytest.fixture(scope="session")
def digits():
    from edgecompress.compress.data import load_splits

    return load_splits("digits")


@pytest.fixture(scope="session")
def zoo_model(digits):
    """``zoo_model(name)``: the zoo model trained on digits' train split (once per session), in eval mode."""
    trained: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in trained:
            trained[name] = train_zoo_model(name, digits.train.inputs["x"], digits.train.y, seed=0)
        return copy.deepcopy(trained[name]).eval()

    return get


def _tensor(ds: Any, n: int | None = None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ds.inputs["x"][:n]))


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every output of ``model`` on ``x`` (tuples flattened), batched."""
    parts = [[t for _, t in flatten_outputs(model(x[i : i + 128]))] for i in range(0, len(x), 128)]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


def _accuracy(model: nn.Module, ds: Any) -> float:
    with torch.no_grad():
        pred = logits_of(model(_tensor(ds))).argmax(1).numpy()
    return float(100.0 * np.mean(pred == ds.y))


def _sqnr(reference: list[torch.Tensor], test: list[torch.Tensor]) -> float:
    ref = np.concatenate([t.reshape(len(t), -1).double().numpy() for t in reference], axis=1)
    out = np.concatenate([t.reshape(len(t), -1).double().numpy() for t in test], axis=1)
    return sqnr_db(ref, out)


def _export(module: nn.Module, dest: Path, fmt: str) -> None:
    """Export to ONNX with the techniques' exporters; ``export_onnx`` verifies onnxruntime against torch
    itself and raises on a mismatch."""
    from edgecompress.compress import registry
    from edgecompress.export import export_onnx

    art = export_onnx(module, INPUT_SHAPE, dest, exporters=registry.onnx_exporters())
    assert art.manifest.format == fmt
    assert len(art.manifest.outputs) == len(_outputs(module, torch.zeros(1, *INPUT_SHAPE)))


def test_the_zoo_covers_every_hazard() -> None:
    assert set(HAZARDS) <= set(ZOO), sorted(set(HAZARDS) - set(ZOO))
    for name, entry in ZOO.items():
        model = entry.build().eval()
        out = model(torch.zeros(2, *INPUT_SHAPE))
        assert logits_of(out).shape == (2, 10), name
        assert all(n in dict(model.named_modules()) for n in entry.must_fold), name


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_trains_to_a_useful_accuracy(name: str, zoo_model, digits) -> None:
    """The floors below compare with fp32; they only mean something if fp32 is good."""
    assert _accuracy(zoo_model(name), digits.test) > 80.0


@pytest.mark.parametrize("name", NAMES)
def test_grouping_and_folding_keep_the_float_function(name: str, zoo_model, digits) -> None:
    """JLCM step 1 alone (rows grouped, permutations folded or stored) must not change the float model:
    a fold through a gate, a residual add, a fan-out, a shared module or a grouped conv would."""
    model = zoo_model(name)
    x = _tensor(digits.test, 64)
    before = _outputs(model, x)
    cfg = JLCMConfig(bits=6, groups=4, steps=0)
    names = select_layers(model, cfg)
    stored = group_and_fold(model, names, cfg, _tensor(digits.calib, 2))
    after = _outputs(model, x)
    for b, a in zip(before, after, strict=True):
        assert (b - a).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), (name, float((b - a).abs().max()))
    # what the codebook layers will be built from is the folded model's weight (rows back in order)
    for layer_name, (w2d, _sizes, gather, folded) in stored.items():
        weight = model.get_submodule(layer_name).weight.detach()
        rows = w2d[gather] if gather is not None else w2d
        assert torch.equal(rows, weight.reshape(weight.shape[0], -1)), layer_name
        assert not (folded and gather is not None), layer_name
    folded = {n for n, (_, _, _, was_folded) in stored.items() if was_folded}
    assert ZOO[name].must_fold <= folded, sorted(ZOO[name].must_fold - folded)


def test_a_fold_that_changes_the_outputs_is_undone(zoo_model, digits) -> None:
    """The check behind the folding rules: a plan that would change the function is undone exactly."""
    from edgecompress.compress.codebook.grouping import FoldPlan, fold_permutations

    model: Any = zoo_model("residual")
    x = _tensor(digits.calib, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(order, torch.arange(8))
    # block1.conv2's output goes into a residual add: folding it into block2.conv1 is wrong
    wrong = FoldPlan(channelwise=[model.block1.conv2[1]], consumers=[(model.block2.conv1[0], 1)])
    assert fold_permutations(model, {"block1.conv2.0": wrong}, {"block1.conv2.0": order}, x) == set()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    right = FoldPlan(channelwise=[model.block1.conv1[1]], consumers=[(model.block1.conv2[0], 1)])
    assert fold_permutations(model, {"block1.conv1.0": right}, {"block1.conv1.0": order}, x) == {"block1.conv1.0"}
    assert not torch.equal(model.block1.conv1[0].weight, before["block1.conv1.0.weight"])


def test_accounting_notes_an_overhead_above_ten_percent_only() -> None:
    """Small rows (depthwise convs) pay a codebook, scales and bounds for few weights: the report says
    so and names them; a model of large layers gets no note."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    _, report = apply_jlcm(big, torch.randn(64, 128), JLCMConfig(bits=4, groups=4, steps=0))
    acct = report["accounting"]
    assert acct["bits_per_weight"] < 4.4 and acct["overhead_note"] is None and acct["overhead_layers"] == []
    small = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                          nn.AvgPool2d(8), nn.Flatten(), nn.Linear(16, 10)).eval()  # fmt: skip
    _, report = apply_jlcm(small, torch.randn(64, 1, 8, 8), JLCMConfig(bits=3, groups=4, steps=0))
    acct = report["accounting"]
    assert acct["bits_per_weight"] > 3.3 and acct["requested_bits"] == 3
    worst = [w["layer"] for w in acct["overhead_layers"]]
    assert set(worst[:2]) == {"0", "2"}  # the 3x3 convs: 144 weights, 9 per row, for a codebook and 4 scales
    shares = [w["share_of_overhead"] for w in acct["overhead_layers"]]
    assert shares == sorted(shares, reverse=True) and 0.9 < sum(shares) <= 1.0 + 1e-9
    assert "+" in acct["overhead_note"] and all(f"{w} (" in acct["overhead_note"] for w in worst)


@pytest.mark.parametrize("name", NAMES)
def test_jlcm_without_learning_at_six_bits_stays_at_fp32(name: str, zoo_model, digits) -> None:
    """Grouping, folding and a fine codebook (64 codewords, no learning): the model must be nearly
    the fp32 one. A wrong fold or a layer replacement that changes the forward collapses it."""
    model = zoo_model(name)
    small, report = apply_jlcm(model, _tensor(digits.calib), JLCMConfig(bits=6, groups=4, steps=0))
    x = _tensor(digits.test)
    sqnr = _sqnr(_outputs(model, x), _outputs(small, x))
    drop = _accuracy(model, digits.test) - _accuracy(small, digits.test)
    assert sqnr > 15.0 and drop < 2.0, (name, round(sqnr, 1), round(drop, 2))


@pytest.mark.parametrize("name", NAMES)
def test_jlcm_four_bits_keeps_accuracy_and_exports(name: str, zoo_model, digits, tmp_path: Path) -> None:
    model = zoo_model(name)
    small, report = apply_jlcm(model, _tensor(digits.calib), JLCMConfig(bits=4, groups=4, steps=20))
    drop = _accuracy(model, digits.test) - _accuracy(small, digits.test)
    assert drop < 8.0, (name, round(drop, 2))
    acct = report["accounting"]
    assert all(layer["index_bits"] == 4 for layer in acct["layers"])
    if acct["bits_per_weight"] > 4 * 1.1:  # small (depthwise) rows: codebook and scales cost a lot per weight
        note = acct["overhead_note"]
        assert note and acct["overhead_layers"][0]["layer"] in note
    else:
        assert acct["overhead_note"] is None
    _export(small, tmp_path / "cb", "onnx-codebook")


@pytest.mark.parametrize("name", ["linear_subclass", "conv_same_padding", "reflect_padding"])
def test_codebook_layers_rebuilt_from_the_layout_keep_the_layer_forward(name: str, zoo_model, digits) -> None:
    """A codebook model rebuilt from its layout (as ``load_codebook_checkpoint`` does) on a fresh copy of
    the architecture gives the same outputs: a layer subclass's own forward and padding survive reload."""
    from edgecompress.compress.codebook.api import codebook_layout, rebuild_codebook_model

    model = zoo_model(name)
    small, _ = apply_jlcm(copy.deepcopy(model), _tensor(digits.calib), JLCMConfig(bits=4, groups=2, steps=0))
    rebuilt = rebuild_codebook_model(copy.deepcopy(model), codebook_layout(small))
    rebuilt.load_state_dict(small.state_dict())
    x = _tensor(digits.test, 64)
    assert torch.equal(_outputs(rebuilt.eval(), x)[0], _outputs(small, x)[0])


@torch.no_grad()
def _max_calibrate(quant: nn.Module, calib: torch.Tensor) -> None:
    """Scales of every LSQ quantizer from the largest magnitude (per output channel for weights, over
    the calibration inputs for activations): the 8-bit grid then only rounds. (LSQ's own init,
    ``2 mean|v| / sqrt(Q_P)``, is a training start: its clip lies far above max|w| at 8 bits.)"""
    from edgecompress.compress.qat.quantizers import quant_wrappers

    seen: dict[str, float] = {}
    hooks = [w.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, max(seen.get(n, 0.0),
                                                                                      float(args[0].abs().max())))
                                         ) for n, w in quant_wrappers(quant)]  # fmt: skip
    quant(calib)
    for h in hooks:
        h.remove()
    for n, wrapper in quant_wrappers(quant):
        wq, aq = wrapper.weight_quant, wrapper.act_quant
        w = wrapper.layer.weight
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if wq.channel_shape else w.abs().max()
        wq.scale.copy_((amax / wq.qrange[1]).clamp(min=1e-8).reshape(wq.scale.shape))
        aq.scale.fill_(max(seen[n], 1e-8) / aq.qrange[1])


@pytest.mark.parametrize("name", NAMES)
def test_w8a8_fake_quant_without_training_stays_at_fp32(name: str, zoo_model, digits, tmp_path: Path) -> None:
    """W8A8 LSQ fake-quantization wraps every Conv2d/Linear; with max-calibrated scales it only rounds,
    so a wrapper that changes a layer's forward (padding, padding_mode, a subclass's own forward)
    shows as a large drop, a low SQNR or a shape error."""
    from edgecompress.compress.qat.config import GAQATConfig
    from edgecompress.compress.qat.prepare import initialize_activation_scales, prepare
    from edgecompress.compress.qat.quantizers import quant_wrappers

    model = zoo_model(name)
    quant = prepare(copy.deepcopy(model), GAQATConfig(bits=8, act_bits=8, first_last_bits=None))
    calib = _tensor(digits.calib)
    initialize_activation_scales(quant, calib)  # LSQ init: signedness of every activation
    quant.eval()
    _max_calibrate(quant, calib)
    assert len(quant_wrappers(quant)) == len(select_layers(model, JLCMConfig()))
    x = _tensor(digits.test)
    sqnr = _sqnr(_outputs(model, x), _outputs(quant, x))
    drop = _accuracy(model, digits.test) - _accuracy(quant, digits.test)
    assert sqnr > 20.0 and drop < 2.0, (name, round(sqnr, 1), round(drop, 2))
    _export(quant, tmp_path / "qdq", "onnx-qdq")


@pytest.mark.parametrize("name", NAMES)
def test_oneshot_two_four_sparsity_keeps_its_pattern(name: str, zoo_model) -> None:
    from edgecompress.compress.checkpoint import ModelBundle
    from edgecompress.compress.sparsity.api import apply_nm_sparsity, check_module_pattern
    from edgecompress.compress.sparsity.config import NMSparsityConfig

    model = zoo_model(name)
    bundle = ModelBundle(model, f"zoo:{name}", INPUT_SHAPE, num_classes=10)
    sparse, metrics = apply_nm_sparsity(bundle, NMSparsityConfig(pattern="2:4", method="oneshot"))
    record = sparse.metadata["nm_sparsity"]
    assert record["layers"] and metrics["sparsity_in_scope"] > 0.2
    assert set(check_module_pattern(sparse.module, record).values()) == {0}
    x = torch.zeros(3, *INPUT_SHAPE)
    assert [t.shape for t in _outputs(sparse.module, x)] == [t.shape for t in _outputs(model, x)]


@pytest.mark.parametrize("name", NAMES)
def test_fp32_onnx_export_verifies(name: str, zoo_model, tmp_path: Path) -> None:
    _export(zoo_model(name), tmp_path / "fp32", "onnx")
