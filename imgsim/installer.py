"""Listing the model catalogue with what is installed, and installing model files with their checksums.

A model file is only ever installed whole and verified: it is written to a temporary file beside its
destination, its sha256 checked (against the catalogue's where the catalogue knows it, and against
the one the user gave), loaded once by onnxruntime to check its output size, then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError
from .files import file_sha256
from .models import CATALOGUE, Model, ModelSpec, find_file, spec_for, user_dir


@dataclass(frozen=True)
class ModelStatus:
    """A catalogue entry and what this machine has of it. `verified` is None when the catalogue has
    no published checksum to compare with (a model you export yourself)."""

    spec: ModelSpec
    path: Path | None
    size: int | None
    sha256: str | None
    verified: bool | None

    def to_dict(self) -> dict:
        return {
            "name": self.spec.name,
            "dimensions": self.spec.dim,
            "input_size": self.spec.preprocess.size,
            "description": self.spec.description,
            "installed": self.path is not None,
            "path": str(self.path) if self.path else None,
            "bytes": self.size,
            "sha256": self.sha256,
            "verified": self.verified,
        }


def status(spec: ModelSpec) -> ModelStatus:
    path = find_file(spec)
    if path is None:
        return ModelStatus(spec, None, None, None, None)
    digest = file_sha256(path)
    verified = None if spec.sha256 is None else digest == spec.sha256
    return ModelStatus(spec, path, path.stat().st_size, digest, verified)


def catalogue_status() -> list[ModelStatus]:
    return [status(spec) for spec in CATALOGUE.values()]


def install_file(name: str, source: str | os.PathLike, sha256: str | None = None) -> Path:
    """Copy a local model file into `user_dir()` under the catalogue's file name, verified."""
    spec = spec_for(name)
    source = Path(source)
    if not source.is_file():
        raise ModelError(f"{source} is not a file")
    with _staging(spec) as (tmp, destination):
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return _verify_and_commit(spec, tmp, destination, sha256, str(source))


def install_url(name: str, url: str, sha256: str, timeout: float = 60.0) -> Path:
    """Download a model file into `user_dir()`; `sha256` is required, so nothing unverified is kept."""
    spec = spec_for(name)
    if not url.startswith(("https://", "http://", "file://")):
        raise ModelError(f"cannot download {url!r}: only http(s) and file URLs are supported")
    with _staging(spec) as (tmp, destination):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as dst:
                shutil.copyfileobj(response, dst, 1 << 20)
        except OSError as e:
            raise ModelError(f"download of {url} failed: {getattr(e, 'reason', None) or e}") from None
        return _verify_and_commit(spec, tmp, destination, sha256, url)


class _staging:
    """A temporary file beside the destination, removed unless it was renamed into place."""

    def __init__(self, spec: ModelSpec):
        self.destination = user_dir() / spec.filename

    def __enter__(self) -> tuple[Path, Path]:
        try:
            self.destination.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.destination.name}.", dir=self.destination.parent)
        except OSError as e:
            raise ModelError(f"cannot write to {self.destination.parent}: {e.strerror or e}") from None
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp, self.destination

    def __exit__(self, *exc) -> None:
        self.tmp.unlink(missing_ok=True)


def _verify_and_commit(spec: ModelSpec, tmp: Path, destination: Path, sha256: str | None, source: str) -> Path:
    """Check the staged copy `tmp` of `source` (the user's file or URL, which errors name) and
    rename it to `destination`."""
    digest = file_sha256(tmp)
    for expected, which in ((sha256, "the given checksum"), (spec.sha256, "the catalogue's checksum")):
        if expected and digest != expected.lower():
            raise ModelError(f"sha256 of {source} is {digest}, which does not match {which} {expected}: not installed")
    _check_output(Model(spec, tmp, digest), source)
    os.replace(tmp, destination)
    return destination


def _check_output(model: Model, source: str) -> None:
    import numpy as np

    size = model.preprocess.size
    try:
        out = model.embed(np.zeros((1, 3, size, size), np.float32))
    except Exception as e:  # onnxruntime raises its own types for a file or graph it cannot use
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = reason.replace(f"model file {model.path} could not be loaded by onnxruntime: ", "")
        reason = reason.replace(str(model.path), source)  # onnxruntime names the staged copy
        raise ModelError(f"{source} is not a usable {model.name} model ({reason}): not installed") from None
    if out.shape != (1, model.dim):
        raise ModelError(f"{source} gives {out.shape[1]}-d embeddings; {model.name} has {model.dim}: not installed")
