"""Exact scores of a query against stored float16 vectors, computed straight from their bytes.

A search re-scores its graph candidates from the vectors in SQLite. Converting those float16 blobs
to float32 in numpy costs more than everything else in a search (numpy has no vectorised float16
cast on most CPUs: ~5 ns a value, 0.3 ms for 64 vectors of 1280-d), so the bytes are handed to a
throw-away FAISS `IndexScalarQuantizer` (`QT_fp16`, which reads float16 with SIMD) instead, and one
L2 search with two queries gives every squared distance needed for the centred cosine:

    (x - c) . (q - c) = (|x - c|^2 + |q - c|^2 - |x - q|^2) / 2

so score(x) = that / (|x - c| |q - c|), with c the collection's mean (0 when scores are not centred).
"""

from __future__ import annotations

import numpy as np


def scores(blobs: bytes, count: int, dim: int, query: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    """Cosine of `query` with each of the `count` float16 vectors in `blobs` (little-endian, `dim` each),
    both taken around `center` if given, as float32, in the order stored."""
    if not count:
        return np.empty(0, np.float32)
    import faiss  # loaded by the first search, not by every command (see cli.py)

    query = np.asarray(query, dtype=np.float32)
    c = np.zeros(dim, np.float32) if center is None else np.asarray(center, dtype=np.float32)
    flat = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
    flat.add_sa_codes(np.frombuffer(blobs, np.uint8).reshape(count, 2 * dim))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # two queries: an OpenMP team would cost more than the work
    try:
        dist, order = flat.search(np.stack([c, query]), count)
    finally:
        faiss.omp_set_num_threads(threads)
    to_center, to_query = np.empty(count, np.float64), np.empty(count, np.float64)
    to_center[order[0]], to_query[order[1]] = dist[0], dist[1]
    qc = float(np.dot(query - c, query - c))
    dots = (to_center + qc - to_query) / 2
    return (dots / np.sqrt(np.maximum(to_center * qc, 1e-24))).astype(np.float32)
