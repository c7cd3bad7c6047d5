"""Query expansion (imgsim/expand.py) on synthetic vectors: it changes the order after the best match
as designed, never moves the best match (an exact copy stays first at 1.0), reports the query's own
scores, and keeps to filters, `exact`, `min_score`, k=1, `similar` and tiny indexes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from imgsim import Index
from imgsim import expand
from imgsim.expand import Expansion
from imgsim.filters import Filter
from imgsim.store import NewImage

from .conftest import TINY_MODEL

DIM = 48


def _unit(*values: float) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[:len(values)] = values
    return v / np.linalg.norm(v)


def _store(index: Index, named: dict[str, np.ndarray]) -> dict[str, int]:
    images = [NewImage(name, 1000, i, hashlib.sha256(name.encode()).hexdigest(), 64, 64, "JPEG", v)
              for i, (name, v) in enumerate(named.items())]
    index.graph.ann  # loaded before the rows exist, as Index.add does
    with index.store.transaction():
        ids = index.store.insert(images)
    index.graph.add(ids, np.stack(list(named.values())))
    return dict(zip(named, ids))


# By the query alone: n 0.936, y 0.92, z 0.82. With n (the best match) added: n, then z (close to n), then y.
ONE = Expansion(neighbours=1)
QUERY = _unit(0.8, 0.6)
PLANTED = {"a/n.jpg": _unit(0.96, 0.28), "b/y.jpg": _unit(0.5, 0.866), "a/z.jpg": _unit(0.95, 0.1, 0.296)}


def _filler(n: int, seed: int) -> dict[str, np.ndarray]:
    """Images in the other dimensions, far from the query (scores near 0)."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((n, DIM))).astype(np.float32)
    x[:, :3] = 0
    return {f"c/f{i:03d}.jpg": v / np.linalg.norm(v) for i, v in enumerate(x)}


@pytest.fixture
def small(tmp_path):
    """Below the size where scores are centred: plain cosine, so the planted scores hold exactly."""
    with Index.create(tmp_path / "idx", model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        ids = _store(index, {**PLANTED, "copy/query.jpg": QUERY, **_filler(20, 0)})
    return tmp_path / "idx", ids


def _names(results) -> list[str]:
    return [r.path for r in results]


def test_expansion_ranks_with_the_best_match_and_keeps_the_query_scores(small):
    path, _ = small
    with Index.open(path, read_only=True) as index:
        # The exact copy is the best match: it stays first, at 1.0, expanded or not.
        for how in (True, False, ONE):
            got = index.search(QUERY, k=4, expand=how)
            assert _names(got)[0] == "copy/query.jpg"
            assert got[0].score == pytest.approx(1.0, abs=1e-3)
        # Without the copy (a filter), n is the best match and pulls z (like n) above y.
        no_copy = Filter(folders=("a", "b", "c"))
        plain = index.search(QUERY, k=3, filter=no_copy, expand=False)
        expanded = index.search(QUERY, k=3, filter=no_copy, expand=ONE)
        assert _names(plain) == ["a/n.jpg", "b/y.jpg", "a/z.jpg"]
        assert _names(expanded) == ["a/n.jpg", "a/z.jpg", "b/y.jpg"]
        # Scores stay the query's own similarity to each result, whatever the order.
        assert {r.path: r.score for r in expanded} == {r.path: r.score for r in plain}
        assert [r.score for r in expanded] == pytest.approx([0.936, 0.82, 0.92], abs=2e-3)
        assert [r.rank for r in expanded] == [1, 2, 3]
        assert _names(index.search(QUERY, k=3, filter=no_copy, exact=True, expand=ONE)) == _names(expanded)
        assert _names(index.search(QUERY, k=3, filter=no_copy, expand=Expansion(walk=True))) == _names(expanded)
        # A light enough neighbour weight leaves the order as it was; a threshold above n's score turns it off.
        assert _names(index.search(QUERY, k=3, filter=no_copy, expand=Expansion(weight=0.1))) == _names(plain)
        assert _names(index.search(QUERY, k=3, filter=no_copy, expand=Expansion(min_score=0.95))) == _names(plain)
        # The neighbour comes from the filtered images: only b and c allowed, y is first and z is out.
        assert _names(index.search(QUERY, k=2, filter=Filter(folders=("b", "c"))))[0] == "b/y.jpg"
        assert _names(index.search(QUERY, k=2, filter=Filter(folders=("b", "c")), expand=ONE))[0] == "b/y.jpg"
        # min_score cuts on the query's own scores (z, 0.82, goes; y, 0.92, stays, after it in rank).
        assert _names(index.search(QUERY, k=3, filter=no_copy, min_score=0.9, expand=ONE)) == ["a/n.jpg", "b/y.jpg"]
        assert [r.score >= 0.9 for r in index.search(QUERY, k=3, filter=no_copy, min_score=0.9)] == [True, True]
        assert _names(index.search(QUERY, k=1, filter=no_copy)) == ["a/n.jpg"]


def test_similar_expands_with_its_best_match_other_than_itself(small):
    path, ids = small
    with Index.open(path, read_only=True) as index:
        # "copy/query.jpg" is left out of its own results; n, its best other match, pulls z above y.
        assert _names(index.similar(ids["copy/query.jpg"], k=3, expand=ONE)) == ["a/n.jpg", "a/z.jpg", "b/y.jpg"]
        assert _names(index.similar(ids["copy/query.jpg"], k=3, expand=False)) == ["a/n.jpg", "b/y.jpg", "a/z.jpg"]
        assert _names(index.similar("copy/query.jpg", k=1)) == ["a/n.jpg"]


def test_tiny_indexes(tmp_path):
    with Index.create(tmp_path / "empty", model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        assert index.search(QUERY, k=5) == []
    with Index.create(tmp_path / "one", model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        ids = _store(index, {"a/n.jpg": PLANTED["a/n.jpg"]})
        assert _names(index.search(QUERY, k=5)) == ["a/n.jpg"]
        assert _names(index.search(QUERY, k=5, exact=True)) == ["a/n.jpg"]
        assert index.similar(ids["a/n.jpg"], k=3) == []


def test_centred_index_best_match_stays_first_and_scores_are_exact(tmp_path):
    """From 200 images on, scores are centred: expansion works in that space, so the best match stays first."""
    rng = np.random.default_rng(1)
    centres = np.abs(rng.standard_normal((12, DIM)))
    x = np.abs(centres[rng.integers(0, 12, 400)] + 0.6 * rng.standard_normal((400, DIM))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with Index.create(tmp_path / "idx", model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        _store(index, {f"g{i % 4}/img{i:03d}.jpg": v for i, v in enumerate(x)})
    changed = 0
    with Index.open(tmp_path / "idx", read_only=True) as index:
        assert index.info()["centred"]
        for q in x[::20] + 0.3 * np.abs(rng.standard_normal((20, DIM))).astype(np.float32):
            plain = index.search(q, k=400, expand=False, exact=True)
            for exact in (False, True):
                expanded = index.search(q, k=10, exact=exact)
                assert expanded[0].id == plain[0].id
                scores = {r.id: r.score for r in plain}
                assert all(r.score == pytest.approx(scores[r.id], abs=1e-5) for r in expanded)
            changed += [r.id for r in expanded] != [r.id for r in plain[:10]]
            # with a filter, the best match is the filter's
            f = Filter(folders=("g1",))
            assert index.search(q, k=3, filter=f)[0].id == index.search(q, k=1, filter=f, expand=False)[0].id
    assert changed > 0  # it does change rankings


def test_several_neighbours_keep_the_best_match_first(tmp_path):
    """With more than one neighbour, an image close to all of them can outscore the best match (here
    `hub`, the three neighbours' mean, by 0.02): the best match is kept first all the same."""
    q = _unit(1.0)
    named = {"best.jpg": _unit(0.8, 0.6), "second.jpg": _unit(0.7, 0.55, 0.45), "third.jpg": _unit(0.7, 0.55, 0, 0.46),
             "hub.jpg": _unit(0.771, 0.596, 0.158, 0.158), **_filler(10, 1)}
    with Index.create(tmp_path / "idx", model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        _store(index, named)
        assert _names(index.search(q, k=2, expand=False)) == ["best.jpg", "hub.jpg"]
        assert _names(index.search(q, k=2, expand=Expansion(neighbours=3, weight=1.0))) == ["best.jpg", "hub.jpg"]
        assert _names(index.search(q, k=2, expand=Expansion(neighbours=3, weight=1.0), exact=True))[0] == "best.jpg"


def test_the_default_is_the_measured_one():
    assert expand.DEFAULT == Expansion(neighbours=3, weight=0.5)
    assert expand.resolve(True) is expand.DEFAULT and expand.resolve(False) is None
