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

from contextlib import nullcontext

import numpy as np

UNIT_TOLERANCE = 1e-3
"""Stored vectors are unit length (float16 rounding moves a norm by well under this); one that is
not, or is not finite, was damaged in the file (`imgsim verify` counts them)."""


def damaged(squared_norms: np.ndarray, center_norm: float = 0.0) -> np.ndarray:
    """Which vectors are not finite unit vectors (NaN included), given their squared norms; or,
    with `center_norm` (|c|), their squared distances to a center c, which for a unit vector lie
    within [(1 - |c|)^2, (1 + |c|)^2] (a bound, enough to keep damaged values out of the scores:
    a cosine is computed from the actual distances, so only non-finite or wild ones would harm)."""
    squared_norms = np.asarray(squared_norms)
    low, high = _unit_bounds(center_norm)
    return ~((squared_norms >= low) & (squared_norms <= high))


def damaged_rows(matrix: np.ndarray) -> np.ndarray:
    """Which rows of a float32 matrix of stored vectors are not finite unit vectors."""
    return damaged(np.einsum("ij,ij->i", matrix, matrix))


def _unit_bounds(center_norm: float) -> tuple[float, float]:
    return max(0.0, 1 - center_norm - UNIT_TOLERANCE) ** 2, (1 + center_norm + UNIT_TOLERANCE) ** 2


class Pool:
    """Candidates' stored vectors (float16 bytes, little-endian, `dim` each), ready to be scored.
    Filled in parts (`add`), so that a search can re-score its best candidates first and read the
    rest only if needed (`graph.py`); each part is scored on its own."""

    def __init__(self, ids: np.ndarray, blobs: bytes, dim: int, center: np.ndarray | None):
        self.ids = np.empty(0, np.int64)
        self.dim = dim
        self._blobs: list[bytes] = []
        self._center = np.zeros(dim, np.float32) if center is None else np.asarray(center, dtype=np.float32)
        self._center_norm = float(np.dot(self._center, self._center)) ** 0.5
        self._parts: list[list] = []  # [FAISS index, squared distances to the center or None, damaged rows]
        self.add(ids, blobs)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: np.ndarray, blobs: bytes) -> None:
        """Append candidates (their float16 blobs joined, in the order of `ids`) as a new part."""
        import faiss  # loaded by the first search, not by every command (see cli.py)

        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        flat = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        flat.add_sa_codes(np.frombuffer(blobs, np.uint8).reshape(len(ids), 2 * self.dim))
        self._parts.append([flat, None, None])
        self._blobs.append(blobs)
        self.ids = np.concatenate([self.ids, ids]) if len(self.ids) else ids

    def vectors(self, positions) -> np.ndarray:
        """The stored vectors at `positions`, as float32 rows (for a few: the cast is slow)."""
        if len(self._blobs) > 1:
            self._blobs = [b"".join(self._blobs)]
        rows = np.frombuffer(self._blobs[0], "<f2").reshape(len(self.ids), self.dim)
        return rows[np.asarray(positions, dtype=np.int64)].astype(np.float32)

    def scores(self, queries: np.ndarray, since: int = 0) -> np.ndarray:
        """(len(queries), len(self) - since): the cosine of each query with each candidate from
        position `since` on (where a part begins), both taken around the center, as float32,
        candidates in stored order; NaN for a candidate whose stored vector is damaged (not a
        finite unit vector: see `damaged`)."""
        import faiss

        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        c = self._center
        around = queries - c
        qc = np.sum(around * around, axis=1, dtype=np.float64)[:, None]
        out, at = [], 0
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a few queries: an OpenMP team would cost more than the work
        try:
            for part in self._parts:
                flat, to_center, bad = part
                count = flat.ntotal
                at += count
                if at <= since:
                    continue
                asked = queries
                if to_center is None:  # the first time: each candidate's distance to the center too
                    asked = np.empty((len(queries) + 1, self.dim), np.float32)
                    asked[0], asked[1:] = c, queries
                dist, order = flat.search(asked, count)
                if order.min() >= 0:  # the candidates' order back from FAISS's best-first one
                    squared = np.empty((len(asked), count), np.float64)
                    squared[np.arange(len(asked))[:, None], order] = dist
                else:  # FAISS leaves out (-1) what a damaged vector makes NaN
                    squared = np.full((len(asked), count), np.inf, np.float64)
                    rows, found = np.nonzero(order >= 0)
                    squared[rows, order[rows, found]] = dist[rows, found]
                if to_center is None:
                    to_center, squared = squared[0], squared[1:]
                    low, high = _unit_bounds(self._center_norm)
                    bad = None
                    if not low <= to_center.min() <= to_center.max() <= high:  # rare: find which
                        bad = damaged(to_center, self._center_norm)
                    part[1], part[2] = to_center, bad
                # The damaged ones' arithmetic overflows: no numpy warnings for it.
                with np.errstate(invalid="ignore", over="ignore") if bad is not None else nullcontext():
                    dots = (to_center[None] + qc - squared) / 2
                    scores = (dots / np.sqrt(np.maximum(to_center[None] * qc, 1e-24))).astype(np.float32)
                if bad is not None:
                    scores[:, bad] = np.nan
                out.append(scores)
        finally:
            faiss.omp_set_num_threads(threads)
        if not out:
            return np.empty((len(queries), 0), np.float32)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)
