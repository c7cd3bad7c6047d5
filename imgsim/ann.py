"""The FAISS half of an index: an HNSW graph over L2-normalised vectors, keyed by SQLite row ids.

The graph holds each vector as 8-bit scalar-quantized codes (FAISS `IndexHNSWSQ`, `QT_8bit`: one
byte per dimension, a per-dimension range learned from the vectors), a quarter of float32: it only
proposes candidates, which `graph.py` re-scores exactly from the vectors stored in SQLite.
A *reduced* graph (for large collections) first projects each vector onto its collection's main
directions (PCA learned from a sample, kept in the file as a FAISS `LinearTransform`: centre, then
project to `code_dim` dimensions), normalises the result and stores codes of that: a fifth of the
bytes per image and of the work per comparison, for candidates that are re-scored exactly anyway.
Inner product on normalised vectors is cosine similarity, so scores are in [-1, 1], higher is closer.
HNSW cannot delete, so ids whose rows are gone stay in the graph as "dead" and are excluded from
every search with an `IDSelector` until the next rebuild. The file is written atomically (temporary
file, fsync, rename) and is only handed to FAISS after its checksum and its whole structure
(`faiss_format.validate`) have been checked, once per file version (`checked.py`): FAISS trusts its
input and can crash on a crafted file. Read-only opens memory-map the codes instead of reading them.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from contextlib import nullcontext
from pathlib import Path

import faiss
import numpy as np

from . import checked
from .errors import IndexCorruptError
from .faiss_format import validate
from .files import discard
from .hnsw import HnswParams  # noqa: F401 (its home was here)

PCA_SAMPLE = 10_000
"""A reduced graph's projection is learned from at most this many of its training vectors."""

TRAIN_MARGIN = 0.1
"""The quantizer's range per dimension is what the training vectors span, widened by this share on
each side (values outside it are clamped; the exact re-scoring makes up for small errors)."""


class AnnIndex:
    """An HNSW index whose ids are SQLite row ids."""

    def __init__(self, index: faiss.IndexIDMap, params: HnswParams):
        self._index = index
        self.params = params
        self._dead = np.empty(0, dtype=np.int64)
        self._ids: np.ndarray | None = None  # id of each stored vector, by position (cached)
        self._projection: tuple[np.ndarray, np.ndarray] | None = None  # (A, b) of a reduced graph (cached)
        self._reduced: bool | None = None  # (cached: the layout never changes)

    @classmethod
    def empty(cls, dim: int, params: HnswParams, reduce_to: int = 0) -> AnnIndex:
        """A new graph; its quantizer (and, with `reduce_to` < dim, its projection onto that many
        dimensions) is trained by the first `add` (or `train`)."""
        code_dim = reduce_to if 0 < reduce_to < dim else dim
        hnsw = faiss.IndexHNSWSQ(code_dim, faiss.ScalarQuantizer.QT_8bit, params.M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = params.ef_construction
        inner = hnsw
        if code_dim < dim:
            inner = faiss.IndexPreTransform(hnsw)
            inner.prepend_transform(faiss.NormalizationTransform(code_dim, 2.0))
            inner.prepend_transform(faiss.LinearTransform(dim, code_dim, True))
            inner.is_trained = False
        # IndexIDMap, not IndexIDMap2: vectors are never looked up by id in FAISS (they come from
        # SQLite), so the id -> position hash table IndexIDMap2 builds at every load is not needed.
        return cls(faiss.IndexIDMap(inner), params)

    @property
    def dim(self) -> int:
        """The dimension of the vectors added and searched with."""
        return self._index.d

    @property
    def code_dim(self) -> int:
        """The dimension the graph stores and compares (smaller than `dim` in a reduced graph)."""
        return self._hnsw.d

    @property
    def reduced(self) -> bool:
        if self._reduced is None:  # asked at every search; each look through FAISS's wrappers costs ~20 us
            self._reduced = self.code_dim < self.dim
        return self._reduced

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def _inner(self):
        return faiss.downcast_index(self._index.index)

    @property
    def _hnsw(self):
        inner = self._inner
        return faiss.downcast_index(inner.index) if isinstance(inner, faiss.IndexPreTransform) else inner

    @property
    def _sq(self):
        return faiss.downcast_index(self._hnsw.storage)

    def _linear(self):
        return faiss.downcast_VectorTransform(self._inner.chain.at(0))

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the graph compares them: for a reduced graph, centred, projected and normalised."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if not self.reduced:
            return vectors
        if self._projection is None:
            lt = self._linear()
            self._projection = (faiss.vector_to_array(lt.A).reshape(self.code_dim, self.dim),
                                faiss.vector_to_array(lt.b))
        a, b = self._projection
        y = vectors @ a.T + b
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

    @property
    def trained(self) -> bool:
        return bool(self._index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Learn the quantizer's range per dimension from `sample` (before anything is added); for
        a reduced graph, first its projection: the sample's mean and main directions (PCA)."""
        sample = np.asarray(sample, dtype=np.float32)
        if self.reduced:
            learn = sample if len(sample) <= PCA_SAMPLE else sample[np.linspace(0, len(sample) - 1, PCA_SAMPLE).astype(int)]
            mean = learn.mean(axis=0, dtype=np.float64)
            centred = learn - mean.astype(np.float32)
            _, vectors = np.linalg.eigh((centred.T @ centred).astype(np.float64))  # ascending eigenvalues
            a = np.ascontiguousarray(vectors[:, ::-1][:, :self.code_dim].T, dtype=np.float32)
            lt = self._linear()
            faiss.copy_array_to_vector(a.ravel(), lt.A)
            faiss.copy_array_to_vector((-(a.astype(np.float64) @ mean)).astype(np.float32), lt.b)
            lt.is_trained = True
            self._projection = None
            sample = self.project(sample)
        low, high = sample.min(axis=0), sample.max(axis=0)
        margin = TRAIN_MARGIN * (high - low) + 1e-3
        low, high = np.maximum(low - margin, -1.0), np.minimum(high + margin, 1.0)
        sq = self._sq
        faiss.copy_array_to_vector(np.concatenate([low, high - low]).astype(np.float32), sq.sq.trained)
        sq.is_trained = True
        self._hnsw.is_trained = True
        self._inner.is_trained = True
        self._index.is_trained = True

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
        """Add vectors (the quantizer is trained on the first ones if it is not yet)."""
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not self.trained:
            self.train(vectors)
        if not self._sq.codes.is_owned:
            # Memory-mapped codes cannot grow (FAISS aborts the process): take an owned copy first.
            self._index = faiss.deserialize_index(faiss.serialize_index(self._index))
        self._index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        self._ids = None

    def _codes(self) -> np.ndarray:
        """The stored codes as an (n, dim) uint8 array: a view of FAISS's memory (or the mapped file)."""
        n, d = len(self), self.code_dim
        if not n:
            return np.empty((0, d), np.uint8)
        return faiss.rev_swig_ptr(self._sq.codes.data(), n * d).reshape(n, d)

    def set_dead(self, dead_ids: np.ndarray) -> None:
        """Ids still in the graph whose rows were removed: never returned by `search`."""
        dead = np.sort(np.asarray(dead_ids, dtype=np.int64).reshape(-1))
        # np.unique, without it: it imports numpy.ma (~20 ms), which nothing else a search does needs.
        self._dead = dead[np.concatenate(([True], dead[1:] != dead[:-1]))] if len(dead) > 1 else dead

    def mean(self) -> np.ndarray | None:
        """The mean of the live vectors as the graph stores them. Decoding is affine per dimension
        (low + (code + 0.5) / 255 * width), so this is the decoded mean of the codes' mean: one pass
        over the codes, nothing read from SQLite. None for a reduced graph (its codes are not the vectors)."""
        if self.reduced:
            return None
        codes = self._codes()
        live = ~np.isin(self.ids(), self._dead) if len(self._dead) else None
        count = int(live.sum()) if live is not None else len(codes)
        if not count or not self.trained:
            return None
        total = np.zeros(self.dim, np.float64)
        for start in range(0, len(codes), 8192):
            part = codes[start:start + 8192]
            if live is not None:
                part = part[live[start:start + 8192]]
            total += part.sum(axis=0, dtype=np.float64)
        trained = faiss.vector_to_array(self._sq.sq.trained).astype(np.float64)
        low, width = trained[:self.dim], trained[self.dim:]
        return (low + (total / count + 0.5) / 255.0 * width).astype(np.float32)

    def live_ids(self) -> np.ndarray:
        ids = self.ids()
        return ids[~np.isin(ids, self._dead)] if len(self._dead) else ids

    @property
    def dead_count(self) -> int:
        return len(self._dead)

    def search(self, queries: np.ndarray, k: int, ef_search: int | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, ids), each (len(queries), k); missing places have id -1. Scores are
        approximate (quantized vectors): callers re-score the candidates exactly.

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
        if len(queries) > 1:
            return self._index.search(queries, k, params=params)
        # One query runs on one thread anyway; an OpenMP team around it only costs (a lot, on a busy machine).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(queries, k, params=params)
        finally:
            faiss.omp_set_num_threads(threads)

    def scan(self, query: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the `k` best of the `allowed` ids by a brute-force pass over their codes
        alone (no graph walk): for selective filters, where a walk would skip almost every node.
        Scores are approximate, like `search`'s."""
        ids = self.ids()
        allowed = np.asarray(allowed, dtype=np.int64)
        if not len(ids) or not len(allowed):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        if np.all(ids[1:] > ids[:-1]):  # rows are added in id order, so this is the usual case
            at = np.minimum(np.searchsorted(ids, allowed), len(ids) - 1)
            positions = at[ids[at] == allowed]
        else:
            positions = np.flatnonzero(np.isin(ids, allowed))
        if len(self._dead):
            positions = positions[~np.isin(ids[positions], self._dead)]
        if not len(positions):
            return np.empty(0, np.float32), np.empty(0, np.int64)
        bitmap = np.zeros((len(ids) + 7) // 8, np.uint8)
        np.bitwise_or.at(bitmap, positions >> 3, (1 << (positions & 7)).astype(np.uint8))
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        params = faiss.SearchParameters()
        params.sel = selector
        k = max(1, min(k, len(positions)))
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, found = self._hnsw.storage.search(np.ascontiguousarray(self.project(query[None])), k,
                                                      params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        keep = found[0] >= 0
        return scores[0][keep], ids[found[0][keep]]

    # -- files -----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self._index).tobytes()

    def stage(self, path: Path) -> tuple[Path, str]:
        """Write to a temporary file beside `path` (see `files.publish`); return it and its sha256.
        FAISS writes the file itself (no second copy of the graph in memory), which is then fsynced
        and hashed through a read-only mapping."""
        import tempfile  # writers only: it costs a cold search ~5-10 ms (random, shutil)

        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # as files.stage
        staged = Path(name)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            faiss.write_index(self._index, f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else name)
            os.fsync(fd)
            size = os.fstat(fd).st_size
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else nullcontext(b"") as data:
                digest = hashlib.sha256(data).hexdigest()
        except BaseException:
            os.close(fd)
            discard(staged)
            raise
        os.close(fd)
        return staged, digest

    @classmethod
    def load(cls, path: Path, expect_sha256: str | tuple[str, ...], dim: int, params: HnswParams, *,
             mapped: bool = False) -> AnnIndex:
        """Read a FAISS file after checking it is one the manifest describes.

        The sha256 and the structure are checked the first time this file version is opened; a
        record of that, kept in the user's cache (`checked.py`), lets later opens skip both. With
        `mapped`, the codes are memory-mapped rather than read (nothing can then be added in place).
        Raises `IndexCorruptError` if it is missing, its sha256 is not among `expect_sha256`, or it is
        not an imgsim graph of dimension `dim`; the caller can then rebuild it from SQLite.
        """
        expected = (expect_sha256,) if isinstance(expect_sha256, str) else tuple(expect_sha256)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise IndexCorruptError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            known = checked.lookup(path, st, dim)
            if known is None or known not in expected:
                digest = _check(fd, st.st_size, path, expected, dim)
                checked.remember(path, st, dim, digest)
            # FAISS reads the very file (inode) that was checked, through its descriptor.
            source = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else str(path)
            try:
                index = faiss.read_index(source, faiss.IO_FLAG_MMAP_IFC if mapped else 0)
            except RuntimeError as e:
                raise IndexCorruptError(f"{path} could not be read by FAISS: {str(e).splitlines()[0]}") from None
        finally:
            os.close(fd)
        if type(index) is not faiss.IndexIDMap or index.d != dim:
            raise IndexCorruptError(f"{path} is not an HNSW index of dimension {dim}")
        return cls(index, params)


def _check(fd: int, size: int, path: Path, expected: tuple[str, ...], dim: int) -> str:
    """The file's sha256 once it is proven to be among `expected` and structurally sound. The file
    is mapped, not read into memory; the problem is raised only after the mapping is closed (numpy
    views of it must be gone by then)."""
    problem = None
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else nullcontext(b"") as data:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in expected:
            problem = f"{path} does not match its manifest (sha256 {digest[:12]}...)"
        else:
            try:
                validate(data, dim)  # FAISS trusts its input: prove the structure before it parses it
            except IndexCorruptError as e:
                problem = f"{path}: {e}"
    if problem is not None:
        raise IndexCorruptError(problem)
    return digest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
