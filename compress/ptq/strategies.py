"""Search strategies over one shared space and evaluator: grid, random, genetic and Quantune.

Lee et al. (2022) compare Quantune's XGBoost-guided search against grid, random and genetic search
on the same space; all four are here behind one interface: ``propose(n)`` returns up to ``n``
configurations not measured yet, ``observe(results)`` feeds back what was measured.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import numpy as np

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.ptq.config import PTQConfig
from edgecompress.compress.ptq.cost_model import CostModel, feature_vector
from edgecompress.compress.ptq.database import PriorRow
from edgecompress.compress.ptq.evaluator import TrialResult
from edgecompress.compress.ptq.space import point_of

log = logging.getLogger(__name__)


class SearchStrategy:
    """Base: keeps the candidates and what has been measured."""

    name = "base"

    def __init__(self, candidates: list[PTQConfig], *, seed: int = 0):
        if not candidates:
            raise ConfigError("the search space is empty")
        self.candidates = list(candidates)
        self.seed = seed
        self.measured: dict[str, TrialResult] = {}
        self.pending: set[str] = set()  # proposed and running (an asynchronous search): never proposed twice
        self.overhead_seconds = 0.0  # time the strategy itself spent (cost-model fits)

    def taken(self, config: PTQConfig) -> bool:
        """Measured already, or in flight."""
        return config.key() in self.measured or config.key() in self.pending

    def started(self) -> int:
        """How many configurations were measured or are in flight."""
        return len(self.measured) + len(self.pending)

    def unexplored(self) -> list[PTQConfig]:
        return [c for c in self.candidates if not self.taken(c)]

    def claim(self, configs: list[PTQConfig]) -> None:
        """Mark proposals as in flight until :meth:`observe` gets their results."""
        self.pending.update(c.key() for c in configs)

    def propose(self, n: int) -> list[PTQConfig]:
        raise NotImplementedError

    def observe(self, results: list[TrialResult]) -> None:
        for r in results:
            self.measured[r.config.key()] = r
            self.pending.discard(r.config.key())


class GridSearch(SearchStrategy):
    """The space in its fixed grid order (first dimension = outermost loop)."""

    name = "grid"

    def propose(self, n: int) -> list[PTQConfig]:
        return self.unexplored()[:n]


class RandomSearch(SearchStrategy):
    """A seeded random permutation of the space."""

    name = "random"

    def __init__(self, candidates: list[PTQConfig], *, seed: int = 0):
        super().__init__(candidates, seed=seed)
        self._order = list(self.candidates)
        random.Random(seed).shuffle(self._order)

    def propose(self, n: int) -> list[PTQConfig]:
        return [c for c in self._order if not self.taken(c)][:n]


class GeneticSearch(SearchStrategy):
    """A genetic algorithm on the space's coordinates: tournament selection, uniform crossover, mutation.

    Each generation's children that were already measured are re-mutated (a few tries) so every
    proposal is a new trial; failed trials get fitness 0.
    """

    name = "genetic"

    def __init__(self, candidates: list[PTQConfig], *, seed: int = 0, population: int = 8, mutation: float = 0.15):
        super().__init__(candidates, seed=seed)
        self._rng = random.Random(seed)
        self.population = population
        self.mutation = mutation
        self._by_point = {self._pkey(point_of(c)): c for c in self.candidates}
        self._dims: dict[str, list[Any]] = {}
        for c in self.candidates:
            for k, v in point_of(c).items():
                if v not in self._dims.setdefault(k, []):
                    self._dims[k].append(v)

    @staticmethod
    def _pkey(point: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(point[k] for k in sorted(point))

    def _fitness(self, r: TrialResult) -> float:
        return r.accuracy if r.accuracy is not None else 0.0

    def _tournament(self, pool: list[TrialResult]) -> dict[str, Any]:
        a, b = self._rng.choice(pool), self._rng.choice(pool)
        return point_of((a if self._fitness(a) >= self._fitness(b) else b).config)

    def _child(self, pool: list[TrialResult]) -> PTQConfig | None:
        for _ in range(30):
            p1, p2 = self._tournament(pool), self._tournament(pool)
            child = {k: (p1[k] if self._rng.random() < 0.5 else p2[k]) for k in p1}
            for k in child:
                if self._rng.random() < self.mutation:
                    child[k] = self._rng.choice(self._dims[k])
            c = self._by_point.get(self._pkey(child))
            if c is not None and not self.taken(c):
                return c
        return None

    def propose(self, n: int) -> list[PTQConfig]:
        left = self.unexplored()
        if not left:
            return []
        if self.started() < self.population:  # the initial random population
            self._rng.shuffle(left)
            return left[: min(n, self.population - self.started())]
        if not self.measured:  # more workers than the population: nothing measured yet to breed from
            self._rng.shuffle(left)
            return left[:n]
        # Parents: the best `population` measured so far (elitist steady-state GA).
        pool = sorted(self.measured.values(), key=self._fitness, reverse=True)[: self.population]
        out: list[PTQConfig] = []
        for _ in range(n):
            c = self._child(pool)
            if c is None or c in out:
                rest = [x for x in self.unexplored() if x not in out]
                if not rest:
                    break
                c = self._rng.choice(rest)
            out.append(c)
        return out


class QuantuneSearch(SearchStrategy):
    """Quantune: an XGBoost cost model trained on other models' trials (the prior), refit online.

    Each round predicts every unexplored configuration of this model, measures the ``n`` best
    predicted, adds them to the training data and refits (Lee et al., 2022, Algorithm 1). Without a
    prior the first ``init_trials`` configurations are random.

    Args:
        candidates: the space.
        descriptors: this model's descriptors.
        fp32_accuracy: this model's fp32 validation accuracy (targets are accuracy changes).
        prior: trials of other models (leave-this-model-out), from the tuning database.
        own_weight: sample weight of this model's trials relative to the prior's.
        objective, max_drop, fp32_latency_ms: with ``latency`` or ``pareto`` a second cost model
            predicts each configuration's latency ratio to fp32 (log scale, from this model's timed
            trials and the prior's in the same runtime context), and candidates predicted within
            ``max_drop`` points (or, for an unbounded fp32 score such as SQNR, at ``min_score`` or
            more) are proposed fastest first, the others after them by accuracy.
    """

    name = "quantune"

    def __init__(
        self,
        candidates: list[PTQConfig],
        *,
        descriptors: dict[str, float],
        fp32_accuracy: float,
        prior: list[PriorRow] | None = None,
        seed: int = 0,
        rounds: int = 200,
        eta: float = 0.15,
        gamma: float = 3.0,
        init_trials: int = 3,
        own_weight: float = 3.0,
        objective: str = "accuracy",
        max_drop: float = 1.0,
        fp32_latency_ms: float | None = None,
        min_score: float = 30.0,
    ):
        super().__init__(candidates, seed=seed)
        self.descriptors = descriptors
        self.fp32_accuracy = fp32_accuracy
        self.prior = prior or []
        self.model = CostModel(rounds=rounds, eta=eta, gamma=gamma, seed=seed)
        self.init_trials = init_trials
        self.own_weight = own_weight
        self._rng = random.Random(seed)
        self._tiebreak = {c.key(): self._rng.random() for c in self.candidates}
        # Scores with an unbounded fp32 (SQNR) have no change to transfer: learn this model's own scores only.
        self._relative = math.isfinite(fp32_accuracy)
        if not self._relative:
            self.prior = []
        self._prior_x = [feature_vector(PTQConfig.from_canonical(r.config), r.descriptors) for r in self.prior]
        self._prior_y = [r.accuracy_delta for r in self.prior]
        self.predictions: dict[str, float] = {}
        self.objective, self.max_drop, self.fp32_latency_ms, self.min_score = objective, max_drop, fp32_latency_ms, min_score
        self.latency_model = CostModel(rounds=rounds, eta=eta, gamma=0.0, seed=seed)
        self._prior_lat = [(x, math.log(r.latency_ratio)) for x, r in zip(self._prior_x, self.prior, strict=True)
                           if r.latency_ratio is not None and r.latency_ratio > 0]  # fmt: skip

    def propose(self, n: int) -> list[PTQConfig]:
        import time

        left = self.unexplored()
        if not left:
            return []
        if not self.prior and (self.started() < self.init_trials or not self.measured):
            self._rng.shuffle(left)
            return left[: max(1, min(n, self.init_trials - self.started()))]
        t0 = time.perf_counter()
        x = list(self._prior_x)
        y = list(self._prior_y)
        w = [1.0] * len(x)
        for r in self.measured.values():
            x.append(feature_vector(r.config, self.descriptors))
            score = r.accuracy if r.accuracy is not None else 0.0
            y.append(score - self.fp32_accuracy if self._relative else score)
            w.append(self.own_weight)
        self.model.fit(x, y, w)
        feats = [feature_vector(c, self.descriptors) for c in left]
        pred = self.model.predict(feats)
        self.predictions.update({c.key(): float(p) for c, p in zip(left, pred, strict=True)})
        tiebreak = np.asarray([self._tiebreak[c.key()] for c in left])
        lat = self._predicted_log_latency(feats)
        if lat is None:  # highest predicted accuracy first; the seeded tie-break keeps equal ones reproducible
            order = np.lexsort((tiebreak, -pred))
        else:  # predicted accurate enough first, fastest first among them; then the rest by accuracy
            feasible = pred >= (-self.max_drop if self._relative else self.min_score)
            order = np.lexsort((tiebreak, np.where(feasible, lat, -pred), ~feasible))
        self.overhead_seconds += time.perf_counter() - t0
        return [left[i] for i in order[:n]]

    def _predicted_log_latency(self, feats: list[list[float]]) -> np.ndarray | None:
        """log(latency / fp32 latency) of each candidate, or None (accuracy objective, or too few timings)."""
        if self.objective not in ("latency", "pareto") or not self.fp32_latency_ms:
            return None
        rows = list(self._prior_lat)
        rows += [(feature_vector(r.config, self.descriptors), math.log(r.latency_ms / self.fp32_latency_ms))
                 for r in self.measured.values() if r.latency_ms]  # fmt: skip
        if len(rows) < 2:
            return None
        self.latency_model.fit([x for x, _ in rows], [y for _, y in rows])
        return self.latency_model.predict(feats)


def make_strategy(
    name: str,
    candidates: list[PTQConfig],
    *,
    seed: int = 0,
    descriptors: dict[str, float] | None = None,
    fp32_accuracy: float = 100.0,
    prior: list[PriorRow] | None = None,
    rounds: int = 200,
    eta: float = 0.15,
    gamma: float = 3.0,
    objective: str = "accuracy",
    max_drop: float = 1.0,
    fp32_latency_ms: float | None = None,
    min_score: float = 30.0,
) -> SearchStrategy:
    """Build the strategy called ``name``.

    Raises:
        ConfigError: unknown strategy (lists the valid ones).
    """
    if name == "grid":
        return GridSearch(candidates, seed=seed)
    if name == "random":
        return RandomSearch(candidates, seed=seed)
    if name == "genetic":
        return GeneticSearch(candidates, seed=seed)
    if name == "quantune":
        return QuantuneSearch(candidates, descriptors=descriptors or {}, fp32_accuracy=fp32_accuracy, prior=prior,
                              seed=seed, rounds=rounds, eta=eta, gamma=gamma, objective=objective, max_drop=max_drop,
                              fp32_latency_ms=fp32_latency_ms, min_score=min_score)  # fmt: skip
    raise ConfigError(f"unknown search strategy {name!r}; valid: quantune, random, grid, genetic")
