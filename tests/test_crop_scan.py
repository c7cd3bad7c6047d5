"""Crop-view candidates (imgsim/crop_scan.py): an uncertain search of a smaller index scores every
image's crop views, so an image whose crop view alone matches the query is found even when its own
vector is nowhere near the graph's candidates. Real SQLite and FAISS; vectors made here (the tiny
model's 48 dimensions), stored as `Index.add` stores embeddings."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from imgsim import Index, crop_codes, crop_scan, crops
from imgsim.filters import Filter
from imgsim.store import NewImage

from .conftest import TINY_MODEL

DIM = 48
N = 400


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def collection(tmp_path):
    """400 images: own vectors in clusters, non-negative (as a CNN's are), and crop views that look
    like none of them (their centres show something else); folders f0..f3 by position."""
    rng = np.random.default_rng(5)
    centres = np.maximum(rng.standard_normal((20, DIM)), 0) ** 1.5
    own = _unit(np.maximum(centres[rng.integers(0, 20, N)] + 0.4 * rng.standard_normal((N, DIM)), 0))
    views = _unit(rng.standard_normal((N, 1, DIM)))
    index = Index.create(tmp_path / "idx", model=TINY_MODEL, root=tmp_path)
    assert index.manifest.preprocess.crop_views == crops.DEFAULT_CROP_VIEWS
    index.graph.ann  # loaded before the rows exist, as Index.add does
    images = [NewImage(f"f{i % 4}/img{i:04d}.jpg", 1000, i, hashlib.sha256(str(i).encode()).hexdigest(), 64, 64,
                       "JPEG", own[i], crops=tuple(crop_codes.encode(crop_codes.TWO_BIT, views[i])))
              for i in range(N)]
    with index.store.transaction():
        ids = index.store.insert(images)
    index.graph.add(ids, own)
    index.graph.save()  # learns the collection's mean: scores are centred, as in any index of 200 images or more
    assert index.manifest.center is not None
    yield index, np.asarray(ids), own, views[:, 0]
    index.close()


def _scans(monkeypatch) -> list[int]:
    calls = []
    scores = crop_scan.CropScan.scores

    def counted(self, query):
        calls.append(1)
        return scores(self, query)

    monkeypatch.setattr(crop_scan.CropScan, "scores", counted)
    return calls


def test_an_image_is_found_by_its_crop_view_alone_in_an_uncertain_search(collection, monkeypatch):
    """(In 48 dimensions, unlike a model's 1280, unrelated vectors often score 0.4-0.55 around their
    mean, so the line below which a search counts as uncertain is drawn higher here: every search
    but a near-copy's; the next test checks that a near-copy's search scans nothing.)"""
    index, ids, own, views = collection
    monkeypatch.setattr(crop_scan, "SCAN_BELOW", 0.8)
    first = {"graph": 0, "scan": 0, "exact": 0}
    for target in range(0, N, 4):
        query = views[target]
        with monkeypatch.context() as mp:  # as before the scan: only the graph's candidates
            mp.setattr(crop_scan, "SCAN_BELOW", -np.inf)
            first["graph"] += index.search(query, k=10)[0].id == ids[target]
        for exact in (False, True):
            results = index.search(query, k=10, exact=exact)
            first["exact" if exact else "scan"] += results[0].id == ids[target]
            assert len({r.id for r in results}) == len(results) == 10
    assert first["scan"] == first["exact"] == N // 4 and first["graph"] < N // 8
    # scored as any candidate's crop view is: its code's cosine with the query, less the penalty
    query = views[123]
    top = index.search(query, k=10)[0]
    code = crop_codes.encode(crop_codes.TWO_BIT, query[None])[0]
    expected = index.graph.score_against(query, crop_codes.decode(crop_codes.TWO_BIT, code, 1, DIM))[0]
    assert top.id == ids[123] and top.score == pytest.approx(expected - crops.CROP_PENALTY, abs=2e-3)
    # only a crop view that clearly leads the graph's best match is added (`SCAN_MARGIN`)
    with monkeypatch.context() as mp:
        mp.setattr(crop_scan, "SCAN_BELOW", -np.inf)
        lead = top.score - index.search(query, k=1)[0].score  # over the graph's best
    assert lead > crop_scan.SCAN_MARGIN
    with monkeypatch.context() as mp:
        mp.setattr(crop_scan, "SCAN_MARGIN", lead + 0.01)
        assert ids[123] not in [r.id for r in index.search(query, k=10)]
    # a filter limits the images the scan adds as it limits the search
    inside = index.search(query, k=5, filter=Filter(folders=("f3",)))
    assert inside[0].id == ids[123]
    outside = index.search(query, k=5, filter=Filter(folders=("f0",)))
    assert ids[123] not in [r.id for r in outside] and all(r.path.startswith("f0/") for r in outside)


def test_a_confident_search_and_a_larger_index_scan_nothing(collection, monkeypatch):
    index, ids, own, views = collection
    monkeypatch.setattr(crop_scan, "SCAN_BELOW", 0.8)  # every search below counts as uncertain (see above)
    calls = _scans(monkeypatch)
    results = index.search(own[42], k=5)  # an indexed picture itself: a near-copy
    assert results[0].id == ids[42] and results[0].score > 0.99 and not calls
    assert index.similar(int(ids[42]), k=5) and not calls  # the image itself is its best match
    index.search(views[42], k=5)
    assert len(calls) == 1
    index.search(views[43], k=5)
    assert len(calls) == 2
    monkeypatch.setattr(crop_scan, "SCAN_LIMIT", N - 1)
    index.graph._crop_scan = None  # made again: an index over the limit has none
    assert ids[42] not in [r.id for r in index.search(views[42], k=5)] and len(calls) == 2


def test_the_scan_follows_images_added_and_removed(collection, tmp_path, monkeypatch):
    index, ids, own, views = collection
    monkeypatch.setattr(crop_scan, "SCAN_BELOW", 0.8)  # every search here is uncertain (see above)
    assert index.search(views[9], k=1)[0].id == ids[9]
    index.forget_files([tmp_path / "f1" / "img0009.jpg"])
    assert ids[9] not in [r.id for r in index.search(views[9], k=10)]
    fresh = _unit(np.random.default_rng(9).standard_normal((1, DIM)))
    image = NewImage("f0/new.jpg", 1000, 1, "ab" * 32, 64, 64, "JPEG", own[9],
                     crops=tuple(crop_codes.encode(crop_codes.TWO_BIT, fresh)))
    with index.store.transaction():
        new_id = index.store.insert([image])
    index.graph.add(new_id, own[9][None])
    assert index.search(fresh[0], k=1)[0].id == new_id[0]


@pytest.mark.parametrize("dim", [10, 48, 1280])
def test_the_scan_scores_every_view_as_a_candidates_views_are_scored(dim):
    """CropScan's table lookups give what `crops._coded_scores` gives from the codes (padding
    included: 10 values leave two unused in the last byte), centred or not; a damaged code never wins."""
    rng = np.random.default_rng(dim)
    vectors = _unit(rng.standard_normal((30, dim)))
    blobs = crop_codes.encode(crop_codes.TWO_BIT, vectors)
    blobs[3] = b"\x00\x7e" + blobs[3][2:]  # a mean of NaN (float16 0x7e00): damaged
    query, center = _unit(rng.standard_normal(dim)), 0.1 * _unit(np.abs(rng.standard_normal(dim)))
    for c in (None, center):
        scan = crop_scan.CropScan(np.arange(10, 40), b"".join(blobs), 1, dim, c)
        expected = crops._coded_scores(query, b"".join(blobs), 30, dim, c)
        got = scan.scores(query)
        assert np.isneginf(got[3]) and np.isnan(expected[3])
        keep = np.arange(30) != 3
        assert np.allclose(got[keep], expected[keep], atol=1e-5)
    two = crop_scan.CropScan(np.arange(15), b"".join(blobs), 2, dim, None)  # two views an image: the better
    pairs = crops._coded_scores(query, b"".join(blobs), 30, dim, None).reshape(15, 2)
    assert np.allclose(two.scores(query), np.nanmax(pairs, axis=1), atol=1e-5)  # image 1: its one good view


def test_every_crop_view_is_read_as_the_candidates_views_are(collection):
    """The scan reads the whole table in one pass: an image with a crop view of the wrong size, or
    none, is left out as `crop_bytes` leaves it out (scored by its own vector alone), and a stray row
    (a view slot the index does not use) is passed over."""
    index, ids, own, views = collection
    store, size = index.store, crop_codes.blob_size(crop_codes.TWO_BIT, DIM)
    with store.transaction():
        store.conn.execute("UPDATE crop_vectors SET vector = x'0102' WHERE id = ?", (int(ids[5]) * 8,))
        store.conn.execute("DELETE FROM crop_vectors WHERE id = ?", (int(ids[6]) * 8,))
        store.conn.execute("INSERT INTO crop_vectors (id, vector) VALUES (?, ?)", (int(ids[7]) * 8 + 3, b"x" * size))
    found, blobs = store.all_crop_bytes(1, size)
    expected = store.crop_bytes(ids, 1, size)
    assert found.tolist() == expected[0].tolist() == [i for i in ids.tolist() if i not in (ids[5], ids[6])]
    assert blobs == expected[1]
