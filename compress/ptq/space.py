"""The Quantune search space: enumerating configurations and encoding them as one-hot features.

Quantune (Lee et al., 2022, section 3) describes a trial by the one-hot configuration plus model
descriptors; this module holds the configuration half.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from edgecompress.compress.ptq.config import ALGORITHM_SETS, PTQConfig, SearchSpace


def _config_from_point(point: dict[str, Any]) -> PTQConfig:
    kw = dict(point)
    cal = str(kw.pop("calibration"))
    if cal.startswith("percentile"):
        kw["calibration"], kw["percentile"] = "percentile", float(cal[len("percentile") :])
    else:
        kw["calibration"] = cal
    kf = str(kw.pop("keep_float"))
    if kf.startswith("sensitive"):
        kw["keep_float"], kw["keep_float_k"] = "sensitive", int(kf[len("sensitive") :])
    else:
        kw["keep_float"] = kf
    kw.setdefault("brevitas", "none")
    return PTQConfig(**kw)


def point_of(config: PTQConfig) -> dict[str, Any]:
    """The space coordinates of ``config`` (inverse of enumeration)."""
    cal = f"percentile{config.percentile:g}" if config.calibration == "percentile" else config.calibration
    kf = f"sensitive{config.keep_float_k}" if config.keep_float == "sensitive" else config.keep_float
    return {
        "calibration": cal,
        "calib_size": config.calib_size,
        "per_channel": config.per_channel,
        "activation_symmetric": config.activation_symmetric,
        "weight_symmetric": config.weight_symmetric,
        "reduce_range": config.reduce_range,
        "weight_bits": config.weight_bits,
        "keep_float": kf,
        "brevitas": config.brevitas,
        "op_types": config.op_types,
        "matmul_4bit": config.matmul_4bit,
        "activation_bits": config.activation_bits,
    }


def applies_to(config: PTQConfig, prepared: Any) -> bool:
    """Whether ``config`` differs, for this model, from the same configuration without its model-specific
    choices: 4-bit MatMuls need constant-weight MatMuls, depthwise convs in float need depthwise convs,
    float first/last layers need two weighted layers (a ``PreparedModel`` says what the model has)."""
    if config.matmul_4bit and not getattr(prepared, "weight_matmuls", ()):
        return False
    if config.keep_float == "depthwise" and not getattr(prepared, "depthwise_nodes", ()):
        return False
    return not (config.keep_float == "first_last" and len(getattr(prepared, "weighted_nodes", ())) < 2)


def enumerate_space(space: SearchSpace, *, brevitas: bool = False) -> list[PTQConfig]:
    """Every configuration of ``space`` in grid order (first dimension = outermost loop); with
    ``brevitas`` (a torch model is at hand) then the brevitas configurations: each algorithm set with
    each activation calibration, calibration size, weight granularity, activation scheme and operator set
    (weights int8 symmetric, no float layers)."""
    dims = space.dimensions()
    names = list(dims)
    out = [_config_from_point(dict(zip(names, values, strict=True))) for values in itertools.product(*dims.values())]
    if brevitas:
        fixed = {"weight_symmetric": True, "reduce_range": False, "weight_bits": 8, "keep_float": "none"}
        out += [_config_from_point({"calibration": cal, "calib_size": n, "per_channel": pc, "activation_symmetric": sym,
                                    "op_types": ops, "brevitas": algos, **fixed})
                for algos in space.brevitas for cal in space.calibration for n in space.calib_size
                for pc in space.per_channel for sym in space.activation_symmetric for ops in space.op_types]  # fmt: skip
    return out


# The one-hot vocabulary is fixed (not derived from one space) so trials of different spaces and models
# share one feature layout in the tuning database.
ONE_HOT_VOCABULARY: dict[str, tuple[Any, ...]] = {
    "calibration": ("minmax", "entropy", "percentile", "distribution"),
    "calib_size_bucket": ("1", "<=32", "<=128", "<=512", ">512"),
    "per_channel": (False, True),
    "activation_symmetric": (False, True),
    "weight_symmetric": (False, True),
    "reduce_range": (False, True),
    "weight_bits": (8, 4),
    "keep_float": ("none", "first_last", "sensitive", "depthwise", "slow"),
    "brevitas": ("none", *ALGORITHM_SETS),
    "op_types": ("all", "weighted"),
    "matmul_4bit": (False, True),
    "activation_bits": (8, 16),
}


def _size_bucket(n: int) -> str:
    if n <= 1:
        return "1"
    for limit in (32, 128, 512):
        if n <= limit:
            return f"<={limit}"
    return ">512"


def config_features(config: PTQConfig) -> dict[str, float]:
    """One-hot features of ``config`` plus two numeric ones (percentile tail, float layers kept)."""
    values = {
        "calibration": config.calibration,
        "calib_size_bucket": _size_bucket(config.calib_size),
        "per_channel": config.per_channel,
        "activation_symmetric": config.activation_symmetric,
        "weight_symmetric": config.weight_symmetric,
        "reduce_range": config.reduce_range,
        "weight_bits": config.weight_bits,
        "keep_float": config.keep_float,
        "brevitas": config.brevitas,
        "op_types": config.op_types,
        "matmul_4bit": config.matmul_4bit,
        "activation_bits": config.activation_bits,
    }
    feats: dict[str, float] = {}
    for name, vocab in ONE_HOT_VOCABULARY.items():
        for v in vocab:
            feats[f"cfg.{name}={v}"] = 1.0 if values[name] == v else 0.0
    # -log10 of the clipped tail: 99.9 -> 3, 99.999 -> 5; 0 for non-percentile methods.
    tail = 100.0 - config.percentile
    feats["cfg.percentile_tail"] = -math.log10(tail / 100.0) if config.calibration == "percentile" else 0.0
    feats["cfg.float_layers"] = float(2 if config.keep_float == "first_last" else config.keep_float_k)
    return feats
