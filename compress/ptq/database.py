"""The Quantune tuning database: every measured trial with its model descriptors, in SQLite.

Quantune (Lee et al., 2022, section 3.3) transfers knowledge between networks by training the cost
model on trials of *other* networks first. This database is that memory: it is also the
evaluator's cache, keyed by (model hash, data hash, configuration key), so a trial is never paid
twice. The default file lives in the user cache (``compress.cache.cache_dir("quantune")``); a seed
database built by ``bench/quantune.py`` ships inside the package so a first-time user has a prior.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecompress.compress.errors import ConfigError
from edgecompress.compress.ptq.config import PTQConfig

SEED_DATABASE = Path(__file__).with_name("seed_trials.sqlite")
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    model_hash TEXT PRIMARY KEY, name TEXT NOT NULL, descriptors TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trials (
    model_hash TEXT NOT NULL, data_hash TEXT NOT NULL, config_key TEXT NOT NULL, config TEXT NOT NULL,
    accuracy REAL, fp32_accuracy REAL NOT NULL, sqnr_db REAL, error TEXT,
    seconds REAL NOT NULL, calibration_seconds REAL NOT NULL, calibrated INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (model_hash, data_hash, config_key)
);
CREATE TABLE IF NOT EXISTS latencies (
    model_hash TEXT NOT NULL, config_key TEXT NOT NULL, context TEXT NOT NULL, p50_ms REAL NOT NULL,
    created REAL NOT NULL, PRIMARY KEY (model_hash, config_key, context)
);
"""
# ``latencies``: a configuration's batch-1 median on one runtime context (machine, providers, threads),
# independent of the data; config_key "fp32" is the unquantized model. Added to schema 1 (older
# files gain the table when opened for writing).


@dataclass
class StoredTrial:
    """One row of the ``trials`` table (``accuracy`` is None when the trial failed; ``error`` says why)."""

    model_hash: str
    data_hash: str
    config_key: str
    config: dict[str, Any]
    accuracy: float | None
    fp32_accuracy: float
    sqnr_db: float | None
    error: str | None
    seconds: float
    calibration_seconds: float
    calibrated: bool


@dataclass
class PriorRow:
    """A trial of some model for training the cost model: descriptors, config and the accuracy change."""

    model_hash: str
    model_name: str
    descriptors: dict[str, float]
    config: dict[str, Any]
    accuracy_delta: float  # quantized - fp32 accuracy, in points; -fp32 for failed trials
    latency_ratio: float | None = None  # quantized / fp32 batch-1 latency in the asked context (None: not timed there)


def default_database_path() -> Path:
    from edgecompress.compress.cache import cache_dir

    return cache_dir("quantune") / "trials.sqlite"


class TuningDatabase:
    """A SQLite file of trials and model descriptors.

    Args:
        path: the database file (created if missing); default: the user cache's ``quantune/trials.sqlite``.

    Raises:
        ConfigError: the file is not a Quantune database (or not SQLite at all).

    Example:
        >>> db = TuningDatabase(tmp_path / "t.sqlite")  # doctest: +SKIP
        >>> db.put_model("abc", "cnn", {"convs": 2.0}); db.models()  # doctest: +SKIP
    """

    def __init__(self, path: str | Path | None = None, *, read_only: bool = False):
        self.path = Path(path) if path is not None else default_database_path()
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise ConfigError(f"tuning database {self.path} does not exist")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as con:
                if not read_only:
                    con.executescript(_SCHEMA)
                row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None and read_only:
                    raise ConfigError(f"{self.path} is not a Quantune tuning database (no schema version)")
                if row is None:
                    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise ConfigError(f"tuning database {self.path} has schema {row[0]}; this version reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path} is not a Quantune tuning database: {exc}") from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            con = sqlite3.connect(self.path, timeout=30)
        try:
            with con:  # commits, or rolls back on error
                yield con
        finally:
            con.close()

    def put_model(self, model_hash: str, name: str, descriptors: dict[str, float]) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?)",
                (model_hash, name, json.dumps(descriptors, sort_keys=True), time.time()),
            )

    def models(self) -> dict[str, tuple[str, dict[str, float]]]:
        """model hash -> (name, descriptors)."""
        with self._connect() as con:
            rows = con.execute("SELECT model_hash, name, descriptors FROM models").fetchall()
        return {h: (n, json.loads(d)) for h, n, d in rows}

    def get_trial(self, model_hash: str, data_hash: str, config_key: str) -> StoredTrial | None:
        with self._connect() as con:
            row = con.execute(
                "SELECT * FROM trials WHERE model_hash=? AND data_hash=? AND config_key=?",
                (model_hash, data_hash, config_key),
            ).fetchone()
        return None if row is None else _stored(row)

    def put_trial(self, trial: StoredTrial) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO trials VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (trial.model_hash, trial.data_hash, trial.config_key, json.dumps(trial.config, sort_keys=True),
                 trial.accuracy, trial.fp32_accuracy, trial.sqnr_db, trial.error, trial.seconds,
                 trial.calibration_seconds, int(trial.calibrated), time.time()),
            )  # fmt: skip

    def get_latency(self, model_hash: str, config_key: str, context: str) -> float | None:
        """The stored p50 (ms) of a configuration in a runtime context, or None."""
        with self._connect() as con:
            try:
                row = con.execute("SELECT p50_ms FROM latencies WHERE model_hash=? AND config_key=? AND context=?",
                                  (model_hash, config_key, context)).fetchone()  # fmt: skip
            except sqlite3.OperationalError:  # a read-only file from before the table existed
                return None
        return None if row is None else float(row[0])

    def put_latency(self, model_hash: str, config_key: str, context: str, p50_ms: float) -> None:
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO latencies VALUES (?, ?, ?, ?, ?)",
                        (model_hash, config_key, context, float(p50_ms), time.time()))  # fmt: skip

    def latency_ratios(self, context: str) -> dict[tuple[str, str], float]:
        """(model hash, config key) -> latency / the model's fp32 latency, for trials timed in ``context``."""
        with self._connect() as con:
            try:
                rows = con.execute("SELECT model_hash, config_key, p50_ms FROM latencies WHERE context=?",
                                   (context,)).fetchall()  # fmt: skip
            except sqlite3.OperationalError:  # a read-only file from before the table existed
                return {}
        fp32 = {h: ms for h, k, ms in rows if k == "fp32" and ms > 0}
        return {(h, k): ms / fp32[h] for h, k, ms in rows if k != "fp32" and h in fp32}

    def trials(self, model_hash: str | None = None) -> list[StoredTrial]:
        with self._connect() as con:
            if model_hash is None:
                rows = con.execute("SELECT * FROM trials ORDER BY created").fetchall()
            else:
                rows = con.execute("SELECT * FROM trials WHERE model_hash=? ORDER BY created", (model_hash,)).fetchall()
        return [_stored(r) for r in rows]

    def prior_rows(self, *, exclude_hashes: set[str] = frozenset(), exclude_names: set[str] = frozenset(),  # type: ignore[assignment]
                   latency_context: str | None = None) -> list[PriorRow]:  # fmt: skip
        """Trials of every model except the excluded ones (leave-this-model-out transfer data), with
        their latency ratio to fp32 where they were timed in ``latency_context`` (latency is per target)."""
        models = self.models()
        ratios = self.latency_ratios(latency_context) if latency_context else {}
        rows = []
        for t in self.trials():
            if t.model_hash in exclude_hashes or t.model_hash not in models:
                continue
            name, desc = models[t.model_hash]
            if name in exclude_names:
                continue
            if not _valid_config(t.config):  # a configuration of an older space (e.g. brevitas' retired QCDQ path)
                continue
            delta = (t.accuracy if t.accuracy is not None else 0.0) - t.fp32_accuracy
            if not math.isfinite(delta):  # an SQNR-scored model: fp32 against itself is unbounded, no change to learn
                continue
            rows.append(PriorRow(t.model_hash, name, desc, t.config, delta, ratios.get((t.model_hash, t.config_key))))
        return rows

    def merge_from(self, other: TuningDatabase) -> int:
        """Copy every model and trial of ``other`` into this database; returns the trials copied."""
        for h, (name, desc) in other.models().items():
            self.put_model(h, name, desc)
        trials = other.trials()
        for t in trials:
            self.put_trial(t)
        return len(trials)


def _valid_config(config: dict[str, Any]) -> bool:
    try:
        PTQConfig.from_canonical(config)
    except (ValueError, TypeError):
        return False
    return True


def _stored(row: tuple[Any, ...]) -> StoredTrial:
    return StoredTrial(
        model_hash=row[0], data_hash=row[1], config_key=row[2], config=json.loads(row[3]), accuracy=row[4],
        fp32_accuracy=row[5], sqnr_db=row[6], error=row[7], seconds=row[8], calibration_seconds=row[9],
        calibrated=bool(row[10]),
    )  # fmt: skip


def load_prior(
    database: TuningDatabase | None,
    *,
    use_seed: bool,
    exclude_hashes: set[str] = frozenset(),  # type: ignore[assignment]
    exclude_names: set[str] = frozenset(),  # type: ignore[assignment]
    latency_context: str | None = None,
) -> list[PriorRow]:
    """Transfer rows from ``database`` and (optionally) the shipped seed database, other models only."""
    rows: list[PriorRow] = []
    seen: set[tuple[str, str]] = set()
    sources = [database] if database is not None else []
    if use_seed and SEED_DATABASE.is_file() and (database is None or database.path.resolve() != SEED_DATABASE.resolve()):
        sources.append(TuningDatabase(SEED_DATABASE, read_only=True))
    for db in sources:
        for r in db.prior_rows(exclude_hashes=exclude_hashes, exclude_names=exclude_names, latency_context=latency_context):
            k = (r.model_hash, json.dumps(r.config, sort_keys=True))
            if k not in seen:
                seen.add(k)
                rows.append(r)
    return rows
