"""Exact scores of queries against stored float16 vectors, computed straight from their bytes.

A search re-scores its graph candidates from the vectors in SQLite. Converting those float16 blobs
to float32 in numpy costs more than everything else in a search (numpy has no vectorised float16
cast on most CPUs: ~5 ns a value, 0.3 ms for 64 vectors of 1280-d), so the bytes are handed to a
throw-away FAISS `IndexScalarQuantizer` (`QT_fp16`, which reads float16 with SIMD) instead, and one
L2 search gives every squared distance needed for the centred cosine:

    (x - c) . (q - c) = (|x - c|^2 + |q - c|^2 - |x - q|^2) / 2

so score(x) = that / (|x - c| |q - c|), with c the collection's mean (0 when scores are not centred).
A `Pool` keeps the candidates so that more queries (query expansion's neighbours) score them again
without another read.
"""

from __future__ import annotations

import numpy as np


class Pool:
    """Candidates' stored vectors (float16 bytes, little-endian, `dim` each), ready to be scored."""

    def __init__(self, ids: np.ndarray, blobs: bytes, dim: int, center: np.ndarray | None):
        import faiss  # loaded by the first search, not by every command (see cli.py)

        self.ids = np.asarray(ids, dtype=np.int64)
        self.dim = dim
        self._blobs = blobs
        self._center = np.zeros(dim, np.float32) if center is None else np.asarray(center, dtype=np.float32)
        self._flat = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        if len(self.ids):
            self._flat.add_sa_codes(np.frombuffer(blobs, np.uint8).reshape(len(self.ids), 2 * dim))
        self._to_center: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def vectors(self, positions) -> np.ndarray:
        """The stored vectors at `positions`, as float32 rows (for a few: the cast is slow)."""
        rows = np.frombuffer(self._blobs, "<f2").reshape(len(self.ids), self.dim)
        return rows[np.asarray(positions, dtype=np.int64)].astype(np.float32)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """(len(queries), len(self)): the cosine of each query with each candidate, both taken
        around the center, as float32, candidates in stored order."""
        import faiss

        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        count, c = len(self.ids), self._center
        if not count:
            return np.empty((len(queries), 0), np.float32)
        asked = queries if self._to_center is not None else np.vstack([c[None], queries])
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a few queries: an OpenMP team would cost more than the work
        try:
            dist, order = self._flat.search(asked, count)
        finally:
            faiss.omp_set_num_threads(threads)
        squared = np.empty((len(asked), count), np.float64)
        np.put_along_axis(squared, order, dist, axis=1)
        if self._to_center is None:
            self._to_center, squared = squared[0], squared[1:]
        qc = np.einsum("ij,ij->i", queries - c, queries - c).astype(np.float64)[:, None]
        dots = (self._to_center[None] + qc - squared) / 2
        return (dots / np.sqrt(np.maximum(self._to_center[None] * qc, 1e-24))).astype(np.float32)

