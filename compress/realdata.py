"""Real data that installed packages ship: photographs and source text, as raw numpy arrays.

* :func:`photo_crops`: random crops of scikit-image's colour photographs (``uint8``, NCHW), for
  calibrating and checking image models (label them with the float model's top-1, then measure
  agreement). Needs scikit-image (the ``examples`` extra: ``pip install -e '.[examples]'``).
* :func:`text_tokens`: byte-level token ids of snippets of the Python standard library's own
  source files, split into disjoint ``train`` and ``eval`` files.
* :func:`train_text_encoder`: gives ``compress.models.encoder.TextEncoder`` non-random weights by
  masked-language modelling on the ``train`` files (about a minute on two CPU cores).

Nothing is preprocessed here: pixels stay 0..255 and ids stay ids; models record their own
preprocessing (see ``compress.models.pretrained.PRETRAINED_INFO``).

Example:
    >>> batch = text_tokens(count=4, seq_len=32, split="eval")
    >>> batch["input_ids"].shape, batch["input_ids"][0, 0] == CLS_ID
    ((4, 32), True)
"""

from __future__ import annotations

import functools
import logging
import math
import sysconfig
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgecompress.compress.errors import DataError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[examples]'"

# ---------------------------------------------------------------------------------------------
# Photographs
# ---------------------------------------------------------------------------------------------

PHOTO_SOURCES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)
"""The RGB photographs scikit-image ships inside its wheel (no download). ``motorcycle_left`` and
``motorcycle_right`` are the two views of ``skimage.data.stereo_motorcycle()``. The grayscale
photographs (camera, coins, moon, ...) are left out: ImageNet models expect colour."""

_MIN_CROP_FRACTION = 0.35


def _import_skimage_data() -> Any:
    try:
        import skimage.data
    except ImportError as exc:
        raise DataError(
            f"real photographs need scikit-image, which is not installed; install the examples extra: "
            f"{INSTALL_HINT}"
        ) from exc
    return skimage.data


@functools.cache
def _photo(name: str) -> np.ndarray:
    data = _import_skimage_data()
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _disparity = data.stereo_motorcycle()
        image = left if name == "motorcycle_left" else right
    else:
        image = getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"scikit-image's {name!r} is not an 8-bit RGB image: {image.dtype} {image.shape}")
    image.setflags(write=False)
    return image


def photo(name: str) -> np.ndarray:
    """One of :data:`PHOTO_SOURCES` as a read-only ``uint8`` HWC RGB array.

    Args:
        name: a name of :data:`PHOTO_SOURCES`.

    Returns:
        The full photograph.

    Raises:
        DataError: unknown name, or scikit-image is missing (the message names the fix).
    """
    if name not in PHOTO_SOURCES:
        raise DataError(f"unknown photograph {name!r}; known: {', '.join(PHOTO_SOURCES)}")
    return _photo(name)


def photo_crops(size: int, count: int = 256, seed: int = 0, *,
                sources: Sequence[str] | None = None) -> np.ndarray:  # fmt: skip
    """Random square crops of real photographs, resized with antialiasing, as raw pixels.

    Each crop picks a photograph uniformly, a side between 35% and 100% of the photograph's shorter
    side, a position, and a horizontal flip with probability 1/2, then resizes the square to
    ``size`` x ``size`` with PIL's bicubic filter (which low-passes when shrinking).

    Args:
        size: output height and width in pixels.
        count: number of crops.
        seed: the crops are a function of ``(size, count, seed, sources)``.
        sources: photographs to crop from (default: all of :data:`PHOTO_SOURCES`).

    Returns:
        ``uint8`` array of shape ``(count, 3, size, size)`` (RGB, NCHW, values 0..255).

    Raises:
        DataError: non-positive size or count, an unknown source, or scikit-image is missing.

    Example:
        >>> photo_crops(224, count=8).shape  # doctest: +SKIP
        (8, 3, 224, 224)
    """
    if size < 1 or count < 1:
        raise DataError(f"photo_crops needs size >= 1 and count >= 1, got size={size}, count={count}")
    names = tuple(sources) if sources is not None else PHOTO_SOURCES
    unknown = [n for n in names if n not in PHOTO_SOURCES]
    if unknown or not names:
        raise DataError(f"unknown photographs {unknown}; known: {', '.join(PHOTO_SOURCES)}")
    from PIL import Image

    images = [Image.fromarray(photo(n)) for n in names]
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, size, size), dtype=np.uint8)
    for i in range(count):
        image = images[int(rng.integers(len(images)))]
        width, height = image.size
        short = min(width, height)
        side = max(1, int(round(short * rng.uniform(_MIN_CROP_FRACTION, 1.0))))
        left = int(rng.integers(width - side + 1))
        top = int(rng.integers(height - side + 1))
        crop = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
        pixels = np.asarray(crop)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        out[i] = pixels.transpose(2, 0, 1)
    return out


# ---------------------------------------------------------------------------------------------
# Byte-level tokenizer and standard-library text
# ---------------------------------------------------------------------------------------------

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3
BYTE_OFFSET = 4
VOCAB_SIZE = 256 + BYTE_OFFSET
SPLITS = ("train", "eval")

# One file in five (by a hash of its name, so adding files to a new Python leaves the others where
# they are) is held out for evaluation. Tiny files (``this.py`` is ROT13 text) are skipped.
_EVAL_EVERY = 5
_MIN_FILE_BYTES = 2048
_MIN_SNIPPET_TOKENS = 16


def _encode_bytes(data: bytes, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    body = np.frombuffer(data[: seq_len - 2], dtype=np.uint8).astype(np.int64) + BYTE_OFFSET
    ids = np.full(seq_len, PAD_ID, dtype=np.int64)
    ids[0] = CLS_ID
    ids[1 : 1 + len(body)] = body
    ids[1 + len(body)] = SEP_ID
    mask = np.zeros(seq_len, dtype=np.int64)
    mask[: len(body) + 2] = 1
    return ids, mask


def encode_text(text: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level tokens: ``[CLS] utf-8 bytes [SEP] [PAD]...``, truncated to ``seq_len``.

    Ids: 0 = PAD, 1 = CLS, 2 = SEP, 3 = MASK, byte ``b`` -> ``b + 4`` (vocabulary 260).

    Args:
        text: the text to encode (its UTF-8 bytes beyond ``seq_len - 2`` are dropped).
        seq_len: length of the returned arrays (at least 2).

    Returns:
        ``(ids, mask)``: int64 arrays of shape ``(seq_len,)``; ``mask`` is 1 on CLS, bytes and SEP.

    Raises:
        DataError: ``seq_len < 2``.

    Example:
        >>> ids, mask = encode_text("hi", 6)
        >>> ids.tolist(), mask.tolist()
        ([1, 108, 109, 2, 0, 0], [1, 1, 1, 1, 0, 0])
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 (CLS and SEP), got {seq_len}")
    return _encode_bytes(text.encode("utf-8"), seq_len)


def decode_text(ids: Sequence[int] | np.ndarray) -> str:
    """The text of byte tokens, ignoring special ids (inverse of :func:`encode_text`).

    Args:
        ids: token ids.

    Returns:
        The decoded text (invalid UTF-8, e.g. a character cut by truncation, becomes U+FFFD).
    """
    data = bytes(int(i) - BYTE_OFFSET for i in np.asarray(ids).reshape(-1) if int(i) >= BYTE_OFFSET)
    return data.decode("utf-8", errors="replace")


def _split_of(file_name: str) -> str:
    return "eval" if zlib.crc32(file_name.encode("utf-8")) % _EVAL_EVERY == 0 else "train"


def stdlib_source_files(split: str) -> list[Path]:
    """The standard-library source files a split draws from, sorted by name.

    The files are the top-level ``*.py`` modules of ``sysconfig.get_paths()["stdlib"]`` of at
    least 2 KiB; ``train`` and ``eval`` are disjoint (one file in five, chosen by a hash of its name,
    is ``eval``).

    Args:
        split: ``"train"`` or ``"eval"``.

    Returns:
        The files of the split.

    Raises:
        DataError: unknown split, or the standard library's sources are not installed.
    """
    if split not in SPLITS:
        raise DataError(f"unknown text split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file() and p.stat().st_size >= _MIN_FILE_BYTES)
    chosen = [p for p in files if _split_of(p.name) == split]
    if not chosen:
        raise DataError(f"no standard-library sources for split {split!r} under {root}")
    return chosen


@functools.lru_cache(maxsize=4)
def _corpus(split: str) -> tuple[bytes, ...]:
    return tuple(p.read_bytes() for p in stdlib_source_files(split))


def text_tokens(count: int = 512, seq_len: int = 64, seed: int = 0, split: str = "eval") -> dict[str, np.ndarray]:
    """Token ids of real text: snippets of the standard library's source files.

    Each snippet starts at the beginning of a line (leading indentation skipped) of a file drawn
    with probability proportional to its size, and holds between 16 and ``seq_len`` tokens
    including CLS and SEP; the rest is padding.

    Args:
        count: number of snippets.
        seq_len: tokens per row (at least 16).
        seed: the rows are a function of ``(count, seq_len, seed, split)`` for a given Python.
        split: ``"train"`` or ``"eval"`` (drawn from disjoint files).

    Returns:
        ``{"input_ids": int64 (count, seq_len), "attention_mask": int64 (count, seq_len)}``.

    Raises:
        DataError: ``count < 1``, ``seq_len < 16``, an unknown split, or no sources installed.
    """
    if count < 1 or seq_len < _MIN_SNIPPET_TOKENS:
        raise DataError(f"text_tokens needs count >= 1 and seq_len >= {_MIN_SNIPPET_TOKENS}, "
                        f"got count={count}, seq_len={seq_len}")  # fmt: skip
    files = _corpus(split)
    sizes = np.array([len(f) for f in files], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(files), size=count, p=sizes / sizes.sum())
    lengths = rng.integers(_MIN_SNIPPET_TOKENS, seq_len + 1, size=count)
    ids = np.empty((count, seq_len), dtype=np.int64)
    mask = np.empty((count, seq_len), dtype=np.int64)
    for row, (pick, length) in enumerate(zip(picks, lengths, strict=True)):
        data = files[int(pick)]
        n_bytes = min(int(length) - 2, len(data))
        offset = int(rng.integers(len(data) - n_bytes + 1))
        line = data.rfind(b"\n", 0, offset) + 1  # start of the line holding the offset
        while line < len(data) - n_bytes and data[line] in b" \t":
            line += 1
        start = min(line, len(data) - n_bytes)
        ids[row], mask[row] = _encode_bytes(data[start : start + n_bytes], seq_len)
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# Masked-language-model training of the text encoder
# ---------------------------------------------------------------------------------------------


def mask_tokens(input_ids: torch.Tensor, mask_prob: float, generator: torch.Generator) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """BERT's masking: pick ``mask_prob`` of the byte tokens; of those 80% MASK, 10% random, 10% kept.

    Args:
        input_ids: int64 ``(B, L)`` ids (special ids and padding are never picked).
        mask_prob: fraction of byte tokens to predict.
        generator: the source of randomness.

    Returns:
        ``(inputs, labels)``: the corrupted ids and the targets (-100 where nothing is predicted).
    """
    candidates = input_ids >= BYTE_OFFSET
    picked = (torch.rand(input_ids.shape, generator=generator) < mask_prob) & candidates
    if not bool(picked.any()):  # guarantee one target so the loss is defined
        first = candidates.flatten().nonzero()[:1]
        picked.view(-1)[first] = True
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(BYTE_OFFSET, VOCAB_SIZE, input_ids.shape, generator=generator)
    inputs = torch.where(picked & (roll < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    inputs = torch.where(picked & (roll >= 0.8) & (roll < 0.9), random_ids, inputs)
    return inputs, labels


@torch.no_grad()
def _evaluate_mlm(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, seed: int) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    inputs, labels = mask_tokens(ids, 0.15, torch.Generator().manual_seed(seed))
    losses, correct, total = [], 0, 0
    for start in range(0, len(ids), 256):
        part = slice(start, start + 256)
        logits = model(inputs[part], attn[part])
        target = labels[part]
        chosen = target != -100
        losses.append(F.cross_entropy(logits[chosen], target[chosen], reduction="sum").item())
        correct += int((logits[chosen].argmax(-1) == target[chosen]).sum())
        total += int(chosen.sum())
    model.train(was_training)
    return sum(losses) / max(total, 1), correct / max(total, 1)


@torch.no_grad()
def embedding_cosine_stats(encoder: nn.Module, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and max cosine similarity between the embeddings of different rows of ``batch``.

    A degenerate encoder (every text mapped to about the same vector) has both near 1.

    Args:
        encoder: maps ``(input_ids, attention_mask)`` to ``(B, D)`` embeddings.
        batch: the output of :func:`text_tokens`.

    Returns:
        ``{"mean": ..., "max": ...}`` over the off-diagonal pairs.
    """
    was_training = encoder.training
    encoder.eval()
    emb = encoder(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
    encoder.train(was_training)
    unit = F.normalize(emb.float(), dim=-1)
    cos = unit @ unit.T
    off = cos[~torch.eye(len(cos), dtype=torch.bool)]
    return {"mean": float(off.mean()), "max": float(off.max())}


def train_text_encoder(steps: int = 600, seed: int = 0, seq_len: int = 64, *, batch_size: int = 64,
                       learning_rate: float = 2e-3, **model_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """Train a :class:`~compress.models.encoder.TextEncoder` by masked-language modelling.

    Every step draws ``batch_size`` fresh snippets of the ``train`` files (:func:`text_tokens`) and
    masks 15% of their bytes; AdamW with linear warm-up and cosine decay. The held-out ``eval`` files
    measure the loss and the masked-token accuracy before and after training. The result depends
    only on the arguments (and torch's thread count, through float summation order).

    Args:
        steps: optimizer steps (600 takes about a minute on two CPU cores).
        seed: seeds the weights, the text drawn and the masking.
        seq_len: tokens per snippet (also the encoder's ``max_len`` unless given).
        batch_size: snippets per step.
        learning_rate: peak AdamW learning rate.
        **model_kwargs: passed to ``TextEncoder`` (``width``, ``layers``, ``heads``, ``ffn``, ...).

    Returns:
        ``(encoder, metrics)``: the encoder in eval mode, without the MLM head, and a dict with
        ``initial_loss``/``final_loss`` and ``initial_accuracy``/``eval_accuracy`` (held-out),
        ``train_loss_first``/``train_loss_last`` (mean of the first/last 10% of steps),
        ``embedding_cosine_mean``/``embedding_cosine_max``, ``seconds``, ``steps``, ``parameters``.

    Raises:
        DataError: ``steps < 1``, ``batch_size < 1`` or ``seq_len`` below 16.
        ConfigError: invalid encoder sizes.

    Example:
        >>> encoder, metrics = train_text_encoder(steps=30)  # doctest: +SKIP
        >>> metrics["final_loss"] < metrics["initial_loss"]  # doctest: +SKIP
        True
    """
    from edgecompress.compress.models.encoder import MaskedLanguageModel, TextEncoder

    if steps < 1 or batch_size < 1:
        raise DataError(f"train_text_encoder needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    model_kwargs.setdefault("max_len", seq_len)
    model_kwargs.setdefault("vocab_size", VOCAB_SIZE)
    started = time.perf_counter()
    train = text_tokens(count=steps * batch_size, seq_len=seq_len, seed=seed, split="train")
    held_out = text_tokens(count=512, seq_len=seq_len, seed=seed + 1, split="eval")
    train_ids, train_attn = torch.from_numpy(train["input_ids"]), torch.from_numpy(train["attention_mask"])
    eval_ids, eval_attn = torch.from_numpy(held_out["input_ids"]), torch.from_numpy(held_out["attention_mask"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = TextEncoder(**model_kwargs)
        model = MaskedLanguageModel(encoder)
    masking = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=learning_rate, betas=(0.9, 0.98),
    )  # fmt: skip
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    initial_loss, initial_accuracy = _evaluate_mlm(model, eval_ids, eval_attn, seed)
    model.train()
    train_losses: list[float] = []
    for step in range(steps):
        rows = slice(step * batch_size, (step + 1) * batch_size)
        inputs, labels = mask_tokens(train_ids[rows], 0.15, masking)
        logits = model(inputs, train_attn[rows])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        train_losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log.info("MLM step %d/%d: loss %.3f", step + 1, steps, float(np.mean(train_losses[-100:])))
    final_loss, eval_accuracy = _evaluate_mlm(model, eval_ids, eval_attn, seed)
    encoder.eval()
    cosine = embedding_cosine_stats(encoder, {k: v[:64] for k, v in held_out.items()})
    tail = max(1, steps // 10)
    metrics: dict[str, Any] = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "initial_accuracy": initial_accuracy,
        "eval_accuracy": eval_accuracy,
        "train_loss_first": float(np.mean(train_losses[:tail])),
        "train_loss_last": float(np.mean(train_losses[-tail:])),
        "embedding_cosine_mean": cosine["mean"],
        "embedding_cosine_max": cosine["max"],
        "seconds": time.perf_counter() - started,
    }
    log.info("MLM training: eval loss %.3f -> %.3f, masked-token accuracy %.3f -> %.3f, %.1f s",
             initial_loss, final_loss, initial_accuracy, eval_accuracy, metrics["seconds"])  # fmt: skip
    return encoder, metrics
