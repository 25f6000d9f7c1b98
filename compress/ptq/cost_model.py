"""Quantune's cost model: an XGBoost regressor from (configuration, model descriptors) to accuracy change.

Lee et al. (2022), section 3.2: features are the one-hot configuration plus model descriptors; the
target is the measured accuracy (we use the change vs fp32, in points, so models of different fp32
accuracy share one scale); squared-error regression with about 200 rounds, eta 0.15, gamma 3.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecompress.compress.ptq.config import PTQConfig
from edgecompress.compress.ptq.descriptors import DESCRIPTOR_NAMES
from edgecompress.compress.ptq.space import config_features


def feature_vector(config: PTQConfig, descriptors: dict[str, float]) -> list[float]:
    """The cost model's input: config one-hots then model descriptors (fixed order)."""
    cfg = config_features(config)
    return [cfg[k] for k in sorted(cfg)] + [float(descriptors.get(k, 0.0)) for k in DESCRIPTOR_NAMES]


class CostModel:
    """XGBoost regressor predicting ``accuracy - fp32_accuracy`` of a configuration on a model.

    Example:
        >>> cm = CostModel(seed=0).fit(rows, targets)  # doctest: +SKIP
        >>> cm.predict(candidate_rows)  # doctest: +SKIP
    """

    def __init__(self, *, rounds: int = 200, eta: float = 0.15, gamma: float = 3.0, seed: int = 0):
        self.rounds, self.eta, self.gamma, self.seed = rounds, eta, gamma, seed
        self._booster: Any = None

    def fit(self, x: list[list[float]], y: list[float], weights: list[float] | None = None) -> CostModel:
        import xgboost as xgb

        dtrain = xgb.DMatrix(np.asarray(x, dtype=np.float32), label=np.asarray(y, dtype=np.float32),
                             weight=None if weights is None else np.asarray(weights, dtype=np.float32))  # fmt: skip
        params = {"objective": "reg:squarederror", "eta": self.eta, "gamma": self.gamma, "max_depth": 6,
                  "seed": self.seed, "nthread": 1, "verbosity": 0}  # fmt: skip
        self._booster = xgb.train(params, dtrain, num_boost_round=self.rounds)
        return self

    @property
    def fitted(self) -> bool:
        return self._booster is not None

    def predict(self, x: list[list[float]]) -> np.ndarray:
        import xgboost as xgb

        if self._booster is None:
            raise RuntimeError("CostModel.predict called before fit")
        return np.asarray(self._booster.predict(xgb.DMatrix(np.asarray(x, dtype=np.float32))), dtype=np.float64)
