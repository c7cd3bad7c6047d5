"""Crop-view candidates: in a smaller index, an uncertain search scores every image's crop views too.

The graph proposes candidates by the images' own vectors, and the best of them are re-scored by
their crop views too (`crops.rerank`). A tight crop of a picture (its centre in grey, blurred or
turned as well) can be so far from the whole picture's vector that the original is not among those
candidates at all, though its crop view would rank it first: 5 of the 18-19 two-edit misses of
issue 12's eighth step (README "How good is it", ninth step). So in an index of at most `SCAN_LIMIT`
images, a search whose best match scores below `SCAN_BELOW` (a near-copy scores far above it) also
scores every crop view, and up to `SCAN_CANDIDATES` images whose crop views clearly lead
(`SCAN_MARGIN`) join the candidates, scored as the others: the higher of their own score and their
crop view's less `crops.CROP_PENALTY`. Every candidate is then scored by its crop views too.

The scan reads no vectors: the 2-bit codes (`crop_codes.py`) are kept in memory, 322 bytes a view,
read once per version of the index (`version`, `build`). Read as product-quantizer codes (FAISS `IndexPQ`:
one sub-vector per 4 values, 256 centroids each, every combination of four levels), a code's bytes
are exactly its levels L, so one PQ search gives every view's L.q by table lookups (~0.5 us a
view here: `scripts/bench_crop_scan.py`); the rest of the centred cosine (`crops._coded_scores`) is per view and kept beside the
codes: its mean m, its length |L + m| and its dot with the collection's mean.
"""

from __future__ import annotations

import numpy as np

from . import crop_codes
from .crops import centred_scores

SCAN_LIMIT = 20_000
"""Scan the crop views of an index of at most this many images (~10 ms more a scanned search at the
limit, and ~90 ms for the first one of an open index, which reads them all)."""

SCAN_BELOW = 0.4
"""Scan only for a search whose best match (before the scan) scores below this. A near-copy of an
indexed picture scores 0.7 and up; for the tight crops the scan found in the evaluation, the graph's
best candidates scored 0.06-0.35. 0.4 found those as 0.5 did, and one blurred picture fewer was lost
to a crop view that looks like many (README "How good is it", ninth step)."""

SCAN_MARGIN = 0.05
"""The scan adds an image only if its crop view, less `crops.CROP_PENALTY`, outscores the search's
best match by more than this. A plain centre (a grey sky, a clip-art page) looks a little like many
queries; one that merely ties with the graph's best is more often such a centre than the original.
A new user's wallpapers among 600 unrelated photos (README "How good is it", ninth step): found
first 206 times of 352 with it, 203 without, 201 with no scan; the evaluation's combinations 0.977
against 0.979 at one sample, the same at the other."""

SCAN_CANDIDATES = 8
"""How many images the scan adds: the best by their crop views, among those not yet candidates."""


class CropScan:
    """The crop views of every image of an index (ids ascending), ready to be scored against queries."""

    def __init__(self, ids: np.ndarray, blobs: bytes, views: int, dim: int, center: np.ndarray | None):
        self.ids, self.views, self.dim = np.asarray(ids, np.int64), views, dim
        self.center = None if center is None else np.asarray(center, np.float32)
        n = len(self.ids) * views
        raw = np.frombuffer(blobs, np.uint8).reshape(n, crop_codes.blob_size(crop_codes.TWO_BIT, dim))
        codes = np.ascontiguousarray(raw[:, crop_codes.HEAD_BYTES:])
        self._mean = raw[:, :crop_codes.HEAD_BYTES].copy().view("<f2")[:, 0].astype(np.float32)
        self._pq = _levels_index(codes, crop_codes.BYTE_LEVELS)
        # Each view's sum of levels and of their squares (|L + m|^2 = |L|^2 + 2 m sum(L) + dim m^2), by the
        # same lookups: the levels (and their squares) dotted with ones, the padding with zeros.
        ones = np.ones(dim, np.float32)
        total = _lookup(self._pq, ones)
        squares = _lookup(_levels_index(codes, crop_codes.BYTE_LEVELS ** 2), ones)
        with np.errstate(invalid="ignore", over="ignore"):  # a damaged mean: NaN, never chosen
            self._length = np.sqrt(np.maximum(squares + self._mean * (2 * total + dim * self._mean), 1e-24))
        self._with_center = None if self.center is None else self._dots(self.center)

    def __len__(self) -> int:
        return len(self.ids)

    def _dots(self, vector: np.ndarray) -> np.ndarray:
        """Each view's dot with `vector` as `crop_codes.decode` makes the view (unit length)."""
        with np.errstate(invalid="ignore", over="ignore"):
            return (_lookup(self._pq, vector) + self._mean * float(vector[:self.dim].sum())) / self._length

    def scores(self, query: np.ndarray) -> np.ndarray:
        """(images,): each image's best crop view's score against `query` (unit length), scored as
        `crops._coded_scores` scores them; -inf for an image whose views are all damaged."""
        if not len(self.ids):
            return np.empty(0, np.float32)
        by_view = centred_scores(lambda vectors: np.stack([self._dots(v) for v in vectors]), query, self.center,
                                 self._with_center)
        by_view = np.where(np.isnan(by_view), -np.inf, by_view).reshape(len(self.ids), self.views)
        return by_view.max(axis=1).astype(np.float32)


def _levels_index(codes: np.ndarray, byte_values: np.ndarray):
    """A FAISS `IndexPQ` holding `codes` (rows of 2-bit code bytes), each byte standing for
    `byte_values[byte]` (256 x 4 values: the levels, or their squares)."""
    import faiss  # loaded by the first search, not by every command (see cli.py)

    slots = codes.shape[1]
    index = faiss.IndexPQ(4 * slots, slots, 8, faiss.METRIC_INNER_PRODUCT)
    centroids = np.broadcast_to(np.asarray(byte_values, np.float32)[None], (slots, 256, 4))
    faiss.copy_array_to_vector(np.ascontiguousarray(centroids).ravel(), index.pq.centroids)
    index.is_trained = True
    if len(codes):
        index.add_sa_codes(np.ascontiguousarray(codes))
    return index


def _lookup(index, vector: np.ndarray) -> np.ndarray:
    """Every stored code's values dotted with `vector` (zeros beyond it: the padding), in stored order."""
    import faiss

    padded = np.zeros((1, index.d), np.float32)
    padded[0, :len(vector)] = vector
    n = index.ntotal
    if not n:
        return np.empty(0, np.float32)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query: an OpenMP team would cost more than the work
    try:
        found, order = index.search(padded, n)
    finally:
        faiss.omp_set_num_threads(threads)
    dots = np.empty(n, np.float32)
    dots[order[0]] = found[0]
    return dots


def version(ann) -> tuple[int, int]:
    """What says the graph's images changed since a `CropScan` was made: its entries, and how many of
    them belong to removed images (ids only grow, so an added or replaced image adds an entry)."""
    return len(ann), ann.dead_count


def build(ann, store, manifest) -> CropScan | None:
    """The `CropScan` of an index's live images (those in the graph `ann` whose rows are in `store`), or
    None where it has more than `SCAN_LIMIT` images or its crop views are not 2-bit codes."""
    views, code, dim = len(manifest.preprocess.crop_views), manifest.preprocess.crop_code, manifest.dim
    if code != crop_codes.TWO_BIT or not views or len(ann) - ann.dead_count > SCAN_LIMIT:
        return None
    size = crop_codes.blob_size(code, dim)
    found, blobs = store.all_crop_bytes(views, size)
    live = ann.live_ids()  # rows the graph holds and that are not removed
    at = np.minimum(np.searchsorted(live, found), max(len(live) - 1, 0))
    kept = (live[at] == found) if len(live) else np.zeros(len(found), bool)
    if not kept.all():
        step = views * size
        blobs = b"".join(blobs[n * step:(n + 1) * step] for n in np.flatnonzero(kept))
        found = found[kept]
    return CropScan(found, blobs, views, dim, manifest.center)
