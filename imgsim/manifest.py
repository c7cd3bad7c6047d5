"""The manifest: what an index says about itself (format, model, preprocessing, graph parameters,
root folder, the FAISS file's checksums, the collection's mean). One typed place that knows its keys
and checks them: a shipped index is untrusted input, so every value is validated on open.

It is stored in SQLite as one JSON value per key (the `manifest` table, see `store.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import crop_codes
from .hnsw import HnswParams
from .errors import ImgsimError, IndexCorruptError, ModelError
from .images import Preprocess, is_soft, parse_view
from .models import parse_pooling, spec_for

FORMAT_VERSION = 7
"""1: the first format. 2: metadata columns (folder, name, EXIF capture time, camera) and labels.
3: vectors stored as float16, an 8-bit quantized graph, and a table of removed ids. 4: an index with
crop views (`imgsim index --centre-view`): an older imgsim, which would add images without them,
refuses it. 5: grey views (``greyNN``), which a format-4 imgsim does not know. 6: crop views stored
as 2-bit codes (`crop_codes.py`), which a format-5 imgsim would take for damaged float16 ones. 7:
soft crop views (``softNN``), which a format-6 imgsim does not know. Each index is written in the
oldest format that holds it (`format_for`), so older imgsims read what they can."""

PLAIN_FORMAT = 3
"""The format of an index without crop views or grey views."""

CROP_FORMAT = 4
"""The oldest format with crop views."""

GREY_FORMAT = 5
"""The oldest format with grey views."""

CODED_FORMAT = 6
"""The oldest format with crop views stored as 2-bit codes."""

SOFT_FORMAT = 7
"""The oldest format with soft crop views."""


def format_for(preprocess: Preprocess) -> int:
    """The format a new index made with this preprocessing is written in: the oldest that holds it."""
    return max(PLAIN_FORMAT, _views_format(preprocess))


def _views_format(preprocess: Preprocess) -> int:
    """The oldest format that knows this preprocessing's views (0: any; older plain indexes are
    upgraded when first opened for writing)."""
    if any(is_soft(v) for v in preprocess.crop_views):
        return SOFT_FORMAT
    if preprocess.crop_views and preprocess.crop_code != crop_codes.FLOAT16:
        return CODED_FORMAT
    if any(parse_view(v)[1] for v in preprocess.index_views + preprocess.crop_views):
        return GREY_FORMAT
    return CROP_FORMAT if preprocess.crop_views else 0

_REQUIRED = ("format_version", "model", "model_sha256", "dim", "preprocess", "hnsw")


@dataclass
class Manifest:
    format_version: int
    model: str
    model_sha256: str
    dim: int
    preprocess: Preprocess
    hnsw: HnswParams
    pooling: str = "avg"
    metric: str = "cosine"
    root: str | None = None
    """The images' root folder, relative to the index files (POSIX separators)."""
    created: float | None = None
    faiss_sha256: str | None = None
    faiss_previous_sha256: str | None = None
    """The checksum before the last save: a crash between the rename and the commit leaves that file."""
    center: np.ndarray | None = field(default=None, repr=False)
    """The collection's mean vector, learned at each save from 200 images on (centred scores)."""
    graph_trained_on: int | None = None
    """How many vectors the graph's quantizer learned its ranges from (it is retrained as the
    collection grows; see `graph.py`)."""

    @classmethod
    def from_stored(cls, data: dict, source: Path) -> Manifest:
        """Validate the key/value pairs read from an index file; anything odd is `IndexCorruptError`."""
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise IndexCorruptError(f"{source} has no {', '.join(missing)} in its manifest")
        version = data["format_version"]
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            # before the rest is checked: a newer format may hold what this imgsim cannot read (views, keys)
            raise ImgsimError(f"{source} was written by a newer imgsim (format {version}): upgrade imgsim to read it")
        try:
            manifest = cls(
                format_version=data["format_version"],
                model=data["model"],
                model_sha256=data["model_sha256"],
                dim=data["dim"],
                preprocess=Preprocess.from_dict(data["preprocess"]),
                hnsw=HnswParams.from_dict(data["hnsw"]),
                pooling=data.get("pooling", "avg"),
                metric=data.get("metric", "cosine"),
                root=data.get("root"),
                created=data.get("created"),
                faiss_sha256=data.get("faiss_sha256"),
                faiss_previous_sha256=data.get("faiss_previous_sha256"),
                center=None if data.get("center") is None else np.asarray(data["center"], np.float32),
                graph_trained_on=data.get("graph_trained_on"),
            )
            sane = manifest._sane()
        except (KeyError, TypeError, ValueError, ModelError):
            sane = False
        if not sane:
            raise IndexCorruptError(f"{source} has an invalid manifest")
        try:
            spec = spec_for(manifest.model)
        except ModelError:
            raise ModelError(f"index {source} was made with model {manifest.model!r}, which this imgsim "
                             f"does not know: upgrade imgsim, or re-index with a known model") from None
        if spec.dim != manifest.dim:
            raise IndexCorruptError(f"{source} says {manifest.model} has {manifest.dim} dimensions, not {spec.dim}")
        return manifest

    def _sane(self) -> bool:
        h, p = self.hnsw, self.preprocess
        parse_pooling(self.pooling)
        checks = (
            isinstance(self.format_version, int) and not isinstance(self.format_version, bool),
            isinstance(self.model, str) and isinstance(self.model_sha256, str),
            isinstance(self.dim, int) and 1 <= self.dim <= 65536,
            2 <= h.M <= 256 and 1 <= h.ef_construction <= 4096 and 1 <= h.ef_search <= 4096,
            isinstance(self.root, (str, type(None))),
            16 <= p.size <= 1024 and p.size <= p.resize_to <= 2048,
            self.format_version >= _views_format(p),  # an older imgsim could add images without their views
            p.resize in ("crop", "squash") and p.interpolation in ("bilinear", "bicubic"),
            all(isinstance(v, (str, type(None))) for v in (self.faiss_sha256, self.faiss_previous_sha256)),
            isinstance(self.created, (int, float, type(None))),
            self.center is None or (self.center.shape == (self.dim,) and bool(np.isfinite(self.center).all())),
            self.graph_trained_on is None or (isinstance(self.graph_trained_on, int)
                                              and not isinstance(self.graph_trained_on, bool)
                                              and self.graph_trained_on >= 0),
        )
        return all(checks)

    def to_stored(self, *keys: str) -> dict:
        """The JSON-ready values of `keys` (all of them by default), as the store keeps them."""
        out = {}
        for f in fields(self):
            if keys and f.name not in keys:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (Preprocess, HnswParams)):
                value = value.to_dict()
            elif isinstance(value, np.ndarray):
                value = [float(v) for v in value]
            out[f.name] = value
        return out

    @property
    def faiss_checksums(self) -> tuple[str, ...]:
        """The FAISS file checksums this manifest accepts: the current one, then the previous."""
        return tuple(filter(None, (self.faiss_sha256, self.faiss_previous_sha256)))
