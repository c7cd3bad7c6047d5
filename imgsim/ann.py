"""The FAISS half of an index: an HNSW graph over L2-normalised vectors, keyed by SQLite row ids.

Inner product on normalised vectors is cosine similarity, so scores are in [-1, 1], higher is closer.
HNSW cannot delete, so ids whose rows are gone stay in the graph as "dead" and are excluded from
every search with an `IDSelector` until the next rebuild. The file is written atomically (temporary
file, fsync, rename) and is only handed to FAISS after its checksum and its whole structure
(`faiss_format.validate`) have been checked: FAISS trusts its input and can crash on a crafted file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import IndexCorruptError
from .faiss_format import validate
from .files import stage


@dataclass(frozen=True)
class HnswParams:
    """HNSW parameters, named as in the paper (Malkov & Yashunin): `M` links per node,
    `ef_construction` candidates while building, `ef_search` candidates while searching."""

    M: int = 32
    ef_construction: int = 64
    ef_search: int = 128

    def to_dict(self) -> dict:
        return {"M": self.M, "ef_construction": self.ef_construction, "ef_search": self.ef_search}

    @classmethod
    def from_dict(cls, data: dict) -> HnswParams:
        return cls(M=int(data["M"]), ef_construction=int(data["ef_construction"]), ef_search=int(data["ef_search"]))


class AnnIndex:
    """An HNSW index whose ids are SQLite row ids."""

    def __init__(self, index: faiss.IndexIDMap2, params: HnswParams):
        self._index = index
        self.params = params
        self._dead = np.empty(0, dtype=np.int64)
        self._ids: np.ndarray | None = None  # id of each stored vector, by position (cached)
        self._order: np.ndarray | None = None  # positions sorted by id, for id -> position look-ups

    @classmethod
    def empty(cls, dim: int, params: HnswParams) -> AnnIndex:
        hnsw = faiss.IndexHNSWFlat(dim, params.M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.ef_construction
        return cls(faiss.IndexIDMap2(hnsw), params)

    @property
    def dim(self) -> int:
        return self._index.d

    def __len__(self) -> int:
        return self._index.ntotal

    def ids(self) -> np.ndarray:
        """The id of each stored vector, by position (read-only, cached until the next `add`)."""
        if self._ids is None:
            self._ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
            self._ids.flags.writeable = False
        return self._ids

    def max_id(self) -> int:
        ids = self.ids()
        return int(ids.max()) if len(ids) else 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self._index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
            self._ids = self._order = None

    def _storage(self) -> np.ndarray:
        """The stored vectors as an (n, dim) array: a view of FAISS's own memory, no copy."""
        n = len(self)
        if not n:
            return np.empty((0, self.dim), np.float32)
        flat = faiss.downcast_index(faiss.downcast_index(self._index.index).storage)
        return faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """The storage position of each id, -1 where the graph does not hold it."""
        stored = self.ids()
        ids = np.asarray(ids, dtype=np.int64)
        if not len(stored) or not len(ids):
            return np.full(len(ids), -1, np.int64)
        if self._order is None:
            self._order = np.argsort(stored, kind="stable")
        sorted_ids = stored[self._order]
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(stored) - 1)
        return np.where(sorted_ids[at] == ids, self._order[at], -1)

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids the graph holds, their vectors), in the order given; ids it lacks are left out."""
        ids = np.asarray(ids, dtype=np.int64)
        where = self.positions(ids)
        found = where >= 0
        return ids[found], self._storage()[where[found]]

    def set_dead(self, dead_ids: np.ndarray) -> None:
        """Ids still in the graph whose rows were removed: never returned by `search`."""
        self._dead = np.unique(np.asarray(dead_ids, dtype=np.int64))

    def mean(self) -> np.ndarray | None:
        """The mean of the live vectors, summed in place from the graph's own storage (no copy, no I/O)."""
        vectors = self._storage()
        live = ~np.isin(self.ids(), self._dead) if len(self._dead) else slice(None)
        if not vectors[live].size:
            return None
        return vectors[live].mean(axis=0, dtype=np.float64).astype(np.float32)

    def live_ids(self) -> np.ndarray:
        ids = self.ids()
        return ids[~np.isin(ids, self._dead)] if len(self._dead) else ids

    @property
    def dead_count(self) -> int:
        return len(self._dead)

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each (len(queries), k); missing places have id -1.

        `allowed` restricts the search to those ids (a metadata filter), inside the graph walk;
        otherwise every live id is searched."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, len(self)))
        if len(self) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef_search or self.params.ef_search, k)
        if allowed is not None:
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            params.sel = batch
            params._keep = batch
        elif len(self._dead):
            batch = faiss.IDSelectorBatch(self._dead)
            params.sel = faiss.IDSelectorNot(batch)
            params._keep = batch  # the selector refers to it; keep it alive as long as params
        return self._index.search(queries, k, params=params)

    # -- files -----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    def stage(self, path: Path) -> tuple[Path, str]:
        """Write to a temporary file beside `path` (see `files.publish`); return it and its sha256."""
        data = self.to_bytes()
        return stage(path, data), hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: Path, expect_sha256: str | tuple[str, ...], dim: int, params: HnswParams) -> AnnIndex:
        """Read a FAISS file after checking it is one the manifest describes.

        Raises `IndexCorruptError` if it is missing, its sha256 is not among `expect_sha256`, or it is
        not an ID-mapped HNSW index of dimension `dim`; the caller can then rebuild it from SQLite.
        """
        expected = (expect_sha256,) if isinstance(expect_sha256, str) else expect_sha256
        try:
            data = path.read_bytes()
        except OSError as e:
            raise IndexCorruptError(f"cannot read {path}: {e.strerror or e}") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest not in expected:
            raise IndexCorruptError(f"{path} does not match its manifest (sha256 {digest[:12]}...)")
        try:
            validate(data, dim)  # FAISS trusts its input: prove the structure before it parses it
        except IndexCorruptError as e:
            raise IndexCorruptError(f"{path}: {e}") from None
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexCorruptError(f"{path} could not be read by FAISS: {str(e).splitlines()[0]}") from None
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
            raise IndexCorruptError(f"{path} is not an HNSW index of dimension {dim}")
        return cls(index, params)

