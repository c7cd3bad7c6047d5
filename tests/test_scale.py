"""The compact layout at a few thousand synthetic vectors: the 8-bit graph re-scored from float16
vectors agrees with an exact search, filters of every selectivity agree with filtering an exact
search, and a memory-mapped graph that must catch up is copied before it grows (FAISS would abort).
Each holds for the full graph and for the reduced one of large collections (made here at a small
size by lowering the threshold)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imgsim import Index, graph, models
from imgsim.faiss_format import code_dim
from imgsim.filters import Filter
from imgsim.hnsw import HnswParams
from imgsim.store import NewImage

from .conftest import TINY_MODEL
from .tiny_model import tiny_spec

DIM = 48


def _vectors(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.maximum(rng.standard_normal((max(1, n // 20), DIM)), 0) ** 1.5
    x = np.maximum(centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, DIM)), 0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _store(index: Index, x: np.ndarray, first: int = 0) -> list[int]:
    """Rows in folders f0..f9 by position, except every 500th image, alone in folder 'rare'."""
    images = [NewImage(("rare" if i % 500 == 0 else f"f{i % 10}") + f"/img{i:05d}.jpg", 1000, i,
                       hashlib.sha256(str(i).encode()).hexdigest(), 64, 64, "JPEG", v)
              for i, v in enumerate(x, start=first)]
    index.graph.ann  # loaded before the rows exist, as Index.add does
    with index.store.transaction():
        ids = index.store.insert(images)
    index.graph.add(ids, x)
    return ids


def _reduce_from(mp: pytest.MonkeyPatch, count: int, dim: int = 16) -> None:
    """Reduce graphs of `count` images on, to `dim` dimensions (10,000 and 256 in the product)."""
    mp.setattr(graph, "REDUCE_FROM", count)
    mp.setattr(graph, "REDUCED_DIM", dim)


@pytest.fixture(scope="module", params=["full", "reduced"])
def big(request, tmp_path_factory, tiny_model_dir):
    path = tmp_path_factory.mktemp("scale") / "idx"
    with pytest.MonkeyPatch.context() as mp:  # the tiny model, as the per-test fixture registers it
        mp.setenv(models.MODELS_ENV, str(tiny_model_dir))
        mp.setitem(models.CATALOGUE, TINY_MODEL, tiny_spec())
        if request.param == "reduced":
            _reduce_from(mp, 1000)
        with Index.create(path, model=TINY_MODEL, crop_views=(), root=path.parent) as index:
            _store(index, _vectors(3000, 0))
            assert index.info()["graph_dim"] == (16 if request.param == "reduced" else DIM)
    return path


def _ids(results) -> list[int]:
    return [r.id for r in results]


def test_quantized_graph_agrees_with_exact_search(big):
    queries = _vectors(3000, 0)[::100] + 0.01
    with Index.open(big, read_only=True) as index:
        assert index.info()["centred"]
        # the graph itself: ranked by the query alone (query expansion would reorder both alike)
        recall = np.mean([len(set(_ids(index.search(q, k=10, expand=False)))
                              & set(_ids(index.search(q, k=10, exact=True, expand=False)))) / 10 for q in queries])
        scores = [r.score for r in index.search(queries[0], k=10, expand=False)]
    assert recall >= 0.98
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("folder", ["rare", "f3", ""])
def test_filters_of_every_selectivity_agree_with_filtering_an_exact_search(big, folder):
    queries = _vectors(3000, 0)[5::300] + 0.01
    with Index.open(big, read_only=True) as index:
        f = Filter(folders=(folder,))
        matching = {row["id"] for row in index.images(f)}
        for q in queries:
            got = index.search(q, k=10, filter=f)
            want = index.search(q, k=10, filter=f, exact=True)
            assert {r.id for r in got} <= matching
            assert len(got) == min(10, len(matching))
            assert len(set(_ids(got)) & set(_ids(want))) >= min(9, len(matching))


@pytest.mark.parametrize("reduced", [False, True], ids=["full", "reduced"])
def test_a_mapped_graph_that_lags_is_copied_before_it_grows(tmp_path, monkeypatch, reduced):
    if reduced:
        _reduce_from(monkeypatch, 500)
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        _store(index, _vectors(600, 1))
        assert index.info()["graph_dim"] == (16 if reduced else DIM)
    with Index.open(path) as index:  # rows the graph file does not have yet
        with index.store.transaction():
            index.store.insert([NewImage("late/one.jpg", 1, 1, "0" * 64, 64, 64, "JPEG", _vectors(1, 2)[0])])
        index.graph._dirty = False  # left unsaved, as after a crash
    with Index.open(path, read_only=True) as index:  # mapped, then caught up: a copy is taken first
        assert len(index.graph) == 601
        assert index.search(_vectors(1, 2)[0], k=1)[0].path == "late/one.jpg"


def test_removed_rows_are_dead_without_comparing_every_id(tmp_path):
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        ids = _store(index, _vectors(400, 3))
    with Index.open(path) as index:
        with index.store.transaction():
            index.store.delete(ids[:10])
        index.graph.forget_removed()
    with Index.open(path, read_only=True) as index:
        assert index.store.removed_ids().tolist() == ids[:10]
        assert index.graph.dead_count == 10
        found = _ids(index.search(_vectors(400, 3)[0], k=20))
        assert not set(found) & set(ids[:10])


def test_neighbours_are_exact_rescored_and_leave_the_image_itself_out(big):
    with Index.open(big, read_only=True) as index:
        ids = np.array([r.id for r in index.rows()][:50])
        near, scores = index.graph.neighbours(ids, 5)
        assert near.shape == scores.shape == (50, 5)
        assert not np.any(near == ids[:, None])
        assert np.all(np.diff(scores, axis=1) <= 1e-6)
        for row in (0, 17, 49):  # the same scores as a search with that image's stored vector
            _, vector = index.graph.vectors(ids[row:row + 1])
            want = [r for r in index.search(vector[0], k=6, expand=False) if r.id != ids[row]][:5]
            assert near[row].tolist() == [r.id for r in want]
            assert np.allclose(scores[row], [r.score for r in want], atol=1e-5)


def test_folder_filter_is_a_prefix_of_whole_folder_names(tmp_path):
    path = tmp_path / "idx"
    names = ["a/x.jpg", "a/b/y.jpg", "a/b/c/z.jpg", "ab/w.jpg", "a0/v.jpg", "a%/u.jpg", "top.jpg"]
    x = _vectors(len(names), 4)
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        with index.store.transaction():
            index.store.insert([NewImage(n, 1, 1, "0" * 64, 64, 64, "JPEG", v) for n, v in zip(names, x)])

        def paths(*folders):
            return sorted(row["path"] for row in index.images(Filter(folders=folders)))

        assert paths("a") == ["a/b/c/z.jpg", "a/b/y.jpg", "a/x.jpg"]
        assert paths("a/b") == ["a/b/c/z.jpg", "a/b/y.jpg"]
        assert paths("a%") == ["a%/u.jpg"]
        assert paths("a_", "'; DROP TABLE images; --") == []
        assert paths("") == sorted(names)


def test_a_collection_grown_in_small_batches_gets_a_reduced_graph(tmp_path, monkeypatch):
    _reduce_from(monkeypatch, 500)
    path = tmp_path / "idx"
    x = _vectors(1700, 5)
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        _store(index, x[:100])
        assert index.info()["graph_dim"] == DIM  # trained on 100: retrained at 400, then reduced at 1,600
    for first in range(100, 1700, 100):
        with Index.open(path) as index:
            _store(index, x[first:first + 100], first=first)
    with Index.open(path, read_only=True) as index:
        info = index.info()
        assert info["graph_dim"] == 16 and info["graph_size"] == 1700 and info["centred"]
        assert code_dim((path.parent / (path.name + ".faiss")).read_bytes(), DIM) == 16
        queries = x[::97] + 0.01
        recall = np.mean([len(set(_ids(index.search(q, k=10))) & set(_ids(index.search(q, k=10, exact=True)))) / 10
                          for q in queries])
    assert recall >= 0.95


def test_a_reduced_graph_is_rebuilt_full_when_the_collection_shrinks(tmp_path, monkeypatch):
    _reduce_from(monkeypatch, 500)
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        ids = _store(index, _vectors(600, 6))
        assert index.info()["graph_dim"] == 16
    with Index.open(path) as index:
        with index.store.transaction():
            index.store.delete(ids[:400])
        index.graph.forget_removed()
    with Index.open(path, read_only=True) as index:  # most entries dead: rebuilt at the save, full again
        assert index.info()["graph_dim"] == DIM and index.info()["graph_size"] == 200
        assert index.search(_vectors(600, 6)[500], k=1)[0].id == ids[500]


def _read_counter(index: Index, monkeypatch) -> list[int]:
    """How many candidates' vectors searches (and duplicate finding) read from SQLite, per call."""
    reads: list[int] = []
    read = index.store.vector_bytes

    def counting(ids, dim):
        reads.append(len(ids))
        return read(ids, dim)

    monkeypatch.setattr(index.store, "vector_bytes", counting)
    return reads


def _low_rank(n: int, seed: int, noise: float = 0.3, rank: int = 6) -> np.ndarray:
    """Unit vectors whose variance lies in `rank` of the 48 dimensions (all kept by a 16-d
    projection), in 150 clusters: as real pictures' features, mostly in the collection's main directions."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:, :rank]
    centres = rng.standard_normal((150, rank)) * 3
    x = centres[rng.integers(0, 150, n)] + noise * rng.standard_normal((n, rank))
    x = (x @ basis.T).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _low_rank_index(tmp_path, monkeypatch) -> tuple[Path, np.ndarray]:
    """A reduced index of 3,000 `_low_rank` vectors, and 20 queries near some of them."""
    _reduce_from(monkeypatch, 1000)
    x = _low_rank(3000, 7)
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        _store(index, x)
    return path, x[::150] + 0.01


def test_a_reduced_graph_reads_only_the_candidates_that_could_still_be_in_the_top_k(tmp_path, monkeypatch):
    """Where the graph's codes rank as the vectors do (here: vectors whose variance lies in 6 of 48
    dimensions, all kept by the 16-d projection), a search re-scores its best candidates first and
    stops reading; the results are those of reading every candidate, and of an exact search."""
    path, queries = _low_rank_index(tmp_path, monkeypatch)
    with Index.open(path, read_only=True) as index:
        assert index.info()["graph_dim"] == 16
        reads = _read_counter(index, monkeypatch)
        staged = [_ids(index.search(q, k=10, expand=False)) for q in queries]
        staged_reads = sum(reads) / len(queries)
        exact = [_ids(index.search(q, k=10, exact=True, expand=False)) for q in queries]
        monkeypatch.setattr(graph, "RERANK_FIRST", 10_000)  # read every candidate at once
        reads.clear()
        whole = [_ids(index.search(q, k=10, expand=False)) for q in queries]
        whole_reads = sum(reads) / len(queries)
    assert whole_reads == graph.RERANK_CANDIDATES
    assert staged_reads <= graph.RERANK_CANDIDATES / 2
    assert staged == whole
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(staged, exact)]) >= 0.98


@pytest.mark.parametrize("big", ["reduced"], indirect=True)  # a full graph reads its candidates at once
def test_reading_in_steps_finds_what_reading_every_candidate_finds(big, monkeypatch):
    """The `big` vectors' neighbours differ by noise spread over all 48 dimensions, which a 16-d
    projection ranks less well: the staged reading goes on past its first step where it must, and
    finds (nearly) what reading every candidate at once finds, unfiltered and under filters."""
    queries = _vectors(3000, 0)[::100] + 0.01
    with Index.open(big, read_only=True) as index:
        assert index.info()["graph_dim"] == 16
        reads = _read_counter(index, monkeypatch)
        first = graph.RERANK_FIRST
        found: dict[str, list] = {}
        for how in ("staged", "whole"):
            if how == "whole":
                monkeypatch.setattr(graph, "RERANK_FIRST", 10_000)
            for name, where in (("all", None), ("f3", Filter(folders=("f3",))), ("rare", Filter(folders=("rare",)))):
                reads.clear()
                found[how, name] = [_ids(index.search(q, k=10, expand=False, filter=where)) for q in queries]
                found[how, name, "reads"] = sum(reads) / len(queries)
        exact = {name: [_ids(index.search(q, k=10, exact=True, expand=False, filter=where)) for q in queries]
                 for name, where in (("all", None), ("f3", Filter(folders=("f3",))))}
    assert found["staged", "all", "reads"] > first  # it went on where the codes disagreed
    assert found["staged", "f3", "reads"] < found["whole", "f3", "reads"] == 300  # f3: every one of its 300
    for name in ("all", "f3"):
        recall = {how: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found[how, name], exact[name])])
                  for how in ("staged", "whole")}
        # The stopping rule is empirical (the largest error seen so far, plus a margin): in this
        # hardest case it may leave one of 100 true neighbours unread (scripts/bench_scale.py, 100k
        # isotropic vectors under a 1% filter: 0.990 against 0.992).
        assert recall["staged"] >= recall["whole"] - 0.015 and recall["staged"] >= 0.97, (name, recall)
    assert found["staged", "rare"] == found["whole", "rare"]  # 6 images: all read, nothing to stop early


def _walk_counter(index: Index, monkeypatch) -> list[int]:
    """How many candidates each graph walk of a search asked for."""
    walks: list[int] = []
    walk = index.graph._walk

    def counting(query, count, ef, allowed):
        walks.append(count)
        return walk(query, count, ef, allowed)

    monkeypatch.setattr(index.graph, "_walk", counting)
    return walks


def test_a_reduced_graph_is_walked_deeper_only_where_a_shallow_walk_cannot_settle_the_top_k(tmp_path, monkeypatch):
    """Where the codes rank as the vectors do, one shallow walk (RERANK_FIRST candidates) settles
    nearly every search, with the results of the full walk."""
    path, queries = _low_rank_index(tmp_path, monkeypatch)
    with Index.open(path, read_only=True) as index:
        walks = _walk_counter(index, monkeypatch)
        shallow = [_ids(index.search(q, k=10, expand=False)) for q in queries]
        assert walks.count(graph.RERANK_FIRST) == len(queries)  # each began with a shallow walk
        assert len(walks) <= 1.2 * len(queries)
        monkeypatch.setattr(graph, "RERANK_FIRST", graph.RERANK_CANDIDATES)  # the full walk, at once
        assert [_ids(index.search(q, k=10, expand=False)) for q in queries] == shallow


@pytest.mark.parametrize("big", ["reduced"], indirect=True)
def test_searches_stop_walking_shallowly_first_where_that_rarely_settles(big, monkeypatch):
    """Here no shallow walk can settle a search (the margin is made too wide for any to): each walks
    again, fully, and finds at least what the full walk alone finds; after a few, searches walk fully
    at once, and still try a shallow walk every SHALLOW_RETRY-th time."""
    queries = _vectors(3000, 0)[::10] + 0.01  # 300
    monkeypatch.setattr(graph, "RERANK_MARGIN", 10.0)
    with Index.open(big, read_only=True) as index:
        walks = _walk_counter(index, monkeypatch)
        found = [index.search(q, k=10, expand=False) for q in queries]
        shallow, full = walks.count(graph.RERANK_FIRST), walks.count(graph.RERANK_CANDIDATES)
        monkeypatch.setattr(graph, "RERANK_FIRST", graph.RERANK_CANDIDATES)  # the full walk alone
        alone = [index.search(q, k=10, expand=False) for q in queries]
    assert full == len(queries)
    assert len(queries) // graph.SHALLOW_RETRY <= shallow <= len(queries) // graph.SHALLOW_RETRY + 10
    for mine, theirs in zip(found, alone):  # a superset of the full walk's candidates: as good or better
        assert np.all(np.array([r.score for r in mine]) >= np.array([r.score for r in theirs]) - 1e-6)
        assert len({r.id for r in mine} & {r.id for r in theirs}) >= 9


@pytest.mark.parametrize("big", ["reduced"], indirect=True)
def test_searches_for_more_results_or_deeper_walk_the_graph_fully_at_once(big, monkeypatch):
    """A shallow walk's 32 candidates rarely settle more than 16 results; a search with its own `ef`
    walks as deep as it says."""
    queries = _vectors(3000, 0)[::300] + 0.01
    with Index.open(big, read_only=True) as index:
        walks = _walk_counter(index, monkeypatch)
        for q in queries:
            index.search(q, k=graph.RERANK_FIRST // 2 + 1, expand=False)
            index.search(q, k=10, expand=False, ef=40)
    assert graph.RERANK_FIRST not in walks
    assert len(walks) == 2 * len(queries)


def test_shallow_walks_are_tried_while_enough_of_them_settle():
    odds = graph._ShallowWalks()
    assert odds.worth_trying()
    for _ in range(10):
        odds.record(settled=False)
    tries = [odds.worth_trying() for _ in range(3 * graph.SHALLOW_RETRY)]
    assert sum(tries) == 3  # one search in SHALLOW_RETRY tries again
    for _ in range(20):
        odds.record(settled=True)
    assert all(odds.worth_trying() for _ in range(10))


@pytest.mark.parametrize("made_with,after", [(40, HnswParams().ef_construction), (400, 400)])
def test_rebuild_raises_an_older_efconstruction_to_the_default(tmp_path, made_with, after):
    """efConstruction only says how hard a build looks for links: `imgsim rebuild` of an index made
    with a lower one uses (and records) today's default; a higher one is kept."""
    path = tmp_path / "idx"
    x = _vectors(400, 8)
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path, hnsw=HnswParams(ef_construction=made_with)) as index:
        ids = _store(index, x)
    with Index.open(path) as index:
        assert index.info()["hnsw"]["ef_construction"] == made_with
        index.rebuild()
    with Index.open(path, read_only=True) as index:
        assert index.info()["hnsw"]["ef_construction"] == after
        assert index.search(x[7], k=1, expand=False)[0].id == ids[7]


def _pairs_above(index: Index, ids: np.ndarray, threshold: float, **how) -> set[tuple[int, int]]:
    pairs = set()
    for start in range(0, len(ids), 256):
        batch = ids[start:start + 256]
        near, scores = index.graph.neighbours(batch, 8, **how)
        rows, cols = np.nonzero((scores >= threshold) & (near >= 0))
        pairs |= {(int(batch[r]), int(near[r, c])) for r, c in zip(rows, cols)}
    return pairs


def test_duplicate_finding_reads_only_candidates_that_could_reach_the_threshold(tmp_path, monkeypatch):
    """`neighbours(..., min_score=t)` (what `imgsim dupes` asks) finds every pair scoring >= t that
    reading every candidate finds, and on a reduced graph of collection-like vectors (with 300
    near-copies) reads far fewer candidates at a high threshold."""
    _reduce_from(monkeypatch, 1000)
    x = _low_rank(2700, 11, noise=1.5, rank=14)
    copies = x[:300] + 0.02 * np.random.default_rng(3).standard_normal((300, DIM)).astype(np.float32)
    path = tmp_path / "idx"
    with Index.create(path, model=TINY_MODEL, crop_views=(), root=tmp_path) as index:
        _store(index, np.vstack([x, copies / np.linalg.norm(copies, axis=1, keepdims=True)]))
    with Index.open(path, read_only=True) as index:
        assert index.info()["graph_dim"] == 16
        ids = index.store.ids()
        reads = _read_counter(index, monkeypatch)
        for threshold in (0.8, 0.95):
            reads.clear()
            every = _pairs_above(index, ids, threshold)
            read_all = sum(reads)
            reads.clear()
            above = _pairs_above(index, ids, threshold, min_score=threshold)
            assert above == every and len(every) >= 300, (threshold, len(every))
            if threshold == 0.95:  # at 0.8 nearly every candidate of these tight clusters could reach it
                assert sum(reads) < 0.5 * read_all, (sum(reads), read_all)


@pytest.mark.parametrize("big", ["reduced"], indirect=True)
def test_duplicate_finding_reads_on_where_the_projection_ranks_worse(big):
    """The `big` vectors' noise lies in all 48 dimensions, which the 16-d projection ranks less
    well, and exact scores exceed approximate ones by more: the rule (the largest excess seen, plus
    `DUPES_MARGIN`) reads on, and finds every pair that reading everything finds (with a margin of
    0.02 it missed 3 of 14,698 pairs at 0.8 and 3 of 2,288 at 0.9)."""
    with Index.open(big, read_only=True) as index:
        ids = index.store.ids()
        for threshold in (0.8, 0.9):
            every = _pairs_above(index, ids, threshold)
            above = _pairs_above(index, ids, threshold, min_score=threshold)
            assert above == every and len(every) > 1000, \
                (threshold, len(above), len(every))
