"""Artifacts: a folder with the model file(s) and a ``manifest.json`` that describes and protects them.

The manifest records the format, the producer, the target, the I/O signature and preprocessing,
the chain of stages with their resolved configs, the sha256 of every file, the parent artifact's
hash and the measured metrics. :func:`load_artifact` refuses unknown format versions and files
whose hashes do not match. Artifacts are written into a temporary folder next to the destination
and renamed into place, so a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edgecompress.export.errors import ArtifactError
from edgecompress.export.fileio import write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PRODUCER = "edgecompress"


def producer_version() -> str:
    try:
        from importlib.metadata import version

        return version("edgecompress")
    except Exception:  # not installed as a distribution (running from a source tree)
        return "0+source"


class TensorSpec(BaseModel):
    """One named model input or output: shape (ints, or names for dynamic dims), dtype, and for
    integer inputs the value range example inputs are drawn from (e.g. token ids ``[0, vocab)``)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | str]
    dtype: str = "float32"
    range: list[float] | None = None


class StageRecord(BaseModel):
    """One step of the artifact's lineage: what was applied, with its fully resolved config."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    seconds: float | None = None


class Manifest(BaseModel):
    """The content of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    manifest_version: int = MANIFEST_VERSION
    format: str  # "onnx", "onnx-qdq", "onnx-codebook", "ort", "tvm"
    format_version: str = ""
    producer: str = PRODUCER
    producer_version: str = Field(default_factory=producer_version)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    model_name: str = ""
    target: dict[str, Any] = {}
    model_file: str
    inputs: list[TensorSpec] = []
    outputs: list[TensorSpec] = []
    preprocessing: dict[str, Any] = {}
    stages: list[StageRecord] = []
    files: dict[str, str] = {}  # relative path -> sha256
    parent_hash: str | None = None
    metrics: dict[str, Any] = {}
    extra: dict[str, Any] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Artifact:
    """A verified artifact folder (use :func:`load_artifact`)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model_file

    @property
    def hash(self) -> str:
        """sha256 of the manifest's file hashes: identifies the artifact's content."""
        return hashlib.sha256(json.dumps(self.manifest.files, sort_keys=True).encode()).hexdigest()

    @property
    def size_bytes(self) -> int:
        """Bytes of the model files (manifest excluded)."""
        return sum((self.path / f).stat().st_size for f in self.manifest.files)

    def update_metrics(self, **metrics: Any) -> None:
        """Merge measured metrics into the manifest and rewrite it atomically."""
        self.manifest.metrics.update(metrics)
        _write_json_atomic(self.path / MANIFEST, self.manifest.model_dump(mode="json"))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_json_atomic(path, data)


def load_artifact(path: str | Path, *, verify: bool = True) -> Artifact:
    """Open an artifact folder and check its manifest and file hashes.

    Raises:
        ArtifactError: no manifest, unknown manifest version, a missing file or a hash mismatch
            (the message names the file).
    """
    p = Path(path)
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{str(p)!r} is not an artifact folder (no {MANIFEST}); create one with 'compress export'")
    try:
        raw = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from None
    version = raw.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ArtifactError(
            f"{mpath} has manifest version {version!r}; this edgecompress reads version {MANIFEST_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except Exception as exc:  # pydantic ValidationError: report as a bad artifact
        raise ArtifactError(f"{mpath} is not a valid manifest: {exc}") from None
    if manifest.model_file not in manifest.files:
        raise ArtifactError(f"{mpath}: model file {manifest.model_file!r} is not listed in 'files'")
    if verify:
        for rel, digest in manifest.files.items():
            f = p / rel
            if not f.is_file():
                raise ArtifactError(f"artifact {p}: file {rel!r} listed in the manifest is missing")
            actual = sha256_file(f)
            if actual != digest:
                raise ArtifactError(
                    f"artifact {p}: file {rel!r} does not match its manifest hash (expected {digest[:12]}..., "
                    f"got {actual[:12]}...); it was modified or corrupted: export it again"
                )
    return Artifact(p, manifest)


@contextlib.contextmanager
def artifact_writer(dest: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Context manager giving a temporary folder to fill; on success it is renamed to ``dest``.

    On an exception the temporary folder is removed and ``dest`` is left as it was.

    Example:
        >>> with artifact_writer("art/") as tmp:
        ...     (tmp / "model.onnx").write_bytes(data)
        ...     write_manifest(tmp, Manifest(format="onnx", model_file="model.onnx"))
    """
    d = Path(dest).resolve()
    if d.exists() and not overwrite:
        raise ArtifactError(f"{d} exists; choose another output folder or allow overwriting")
    if d.exists() and not d.is_dir():
        raise ArtifactError(f"output path {d} exists and is not a folder")
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=d.parent))
    try:
        yield tmp
        if d.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{d.name}.old-", dir=d.parent))
            os.replace(d, old / "x")
            os.replace(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, d)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``folder`` (except the manifest) into ``manifest.files`` and write it."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = sha256_file(f)
    manifest.files = files
    _write_json_atomic(folder / MANIFEST, manifest.model_dump(mode="json"))
    return manifest
