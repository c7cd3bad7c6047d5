"""imgsim.scoring: scores straight from stored float16 bytes equal the float32 arithmetic they replace,
for one query and for several at once (query expansion scores its neighbours so)."""

from __future__ import annotations

import numpy as np
import pytest

from imgsim.scoring import Pool
from imgsim.store import vector_blob


@pytest.mark.parametrize("dim,count", [(8, 2), (48, 64), (1280, 100), (2048, 7)])
@pytest.mark.parametrize("centred", [False, True])
def test_scores_from_bytes_match_numpy(dim, count, centred):
    rng = np.random.default_rng(dim + count)
    x = np.abs(rng.standard_normal((count, dim))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blobs = b"".join(vector_blob(v) for v in x)
    query = x[0] + 0.05 * rng.standard_normal(dim).astype(np.float32)
    center = x.mean(axis=0) if centred else None
    stored = np.frombuffer(blobs, "<f2").reshape(count, dim).astype(np.float32)
    c = center if centred else np.zeros(dim, np.float32)
    want = (stored - c) @ (query - c) / np.linalg.norm(stored - c, axis=1) / np.linalg.norm(query - c)
    pool = Pool(np.arange(count) + 7, blobs, dim, center)
    got = pool.scores(query)[0]
    assert got.shape == (count,) and got.dtype == np.float32
    assert np.allclose(got, want, atol=2e-5)
    again = pool.scores(np.stack([query, stored[-1]]))  # several queries, the pool's distances reused
    assert np.allclose(again[0], want, atol=2e-5)
    assert np.allclose(again[1, -1], 1.0, atol=2e-5)
    assert np.array_equal(pool.vectors([count - 1]), stored[-1:])
    assert Pool(np.empty(0, np.int64), b"", dim, center).scores(query).shape == (1, 0)


def test_an_identical_vector_scores_one_and_the_order_is_kept():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blobs = b"".join(vector_blob(v) for v in x)
    stored = np.frombuffer(blobs, "<f2").reshape(5, 32).astype(np.float32)
    got = Pool(np.arange(5), blobs, 32, x.mean(axis=0)).scores(stored[3])[0]
    assert int(np.argmax(got)) == 3 and got[3] == pytest.approx(1.0, abs=1e-5)


def test_a_pool_filled_in_parts_scores_as_one_filled_at_once():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # stored vectors are unit length
    blobs = [vector_blob(v) for v in x]
    center = x.mean(axis=0)
    whole = Pool(np.arange(40), b"".join(blobs), 64, center)
    parts = Pool(np.arange(16), b"".join(blobs[:16]), 64, center)
    first = parts.scores(x[:2])
    parts.add(np.arange(16, 40), b"".join(blobs[16:]))
    assert np.array_equal(parts.ids, np.arange(40)) and len(parts) == 40
    assert np.allclose(parts.scores(x[:2]), whole.scores(x[:2]), atol=1e-6)
    assert np.allclose(parts.scores(x[:2], since=16), whole.scores(x[:2])[:, 16:], atol=1e-6)
    assert np.allclose(first, whole.scores(x[:2])[:, :16], atol=1e-6)
    assert np.array_equal(parts.vectors([3, 30]), whole.vectors([3, 30]))


def test_a_damaged_stored_vector_scores_nan_and_the_others_are_unchanged():
    """Bytes damaged in the file (a vector no longer finite, or no longer unit length) must not
    come out as a result with a garbage score (a trial saw 499999997952.0): NaN, for the caller
    to leave out."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    blobs = [vector_blob(v) for v in x]
    good = Pool(np.arange(6), b"".join(blobs), 32, x.mean(axis=0)).scores(x[0])[0]
    blobs[2] = np.full(32, 60000, "<f2").tobytes()  # huge but finite
    blobs[4] = np.full(32, np.inf, "<f2").tobytes()
    got = Pool(np.arange(6), b"".join(blobs), 32, x.mean(axis=0)).scores(x[0])[0]
    assert np.isnan(got[[2, 4]]).all()
    assert np.allclose(got[[0, 1, 3, 5]], good[[0, 1, 3, 5]], atol=1e-6)
